"""Convolutions in 1, 2 and 3 spatial dimensions: ``Conv``, ``ConvTranspose`` (op, backward, layer).

Layout is channels-last, as in Flax and TensorFlow: inputs ``(batch, *spatial, channels)``
(NWC, NHWC, NDHWC), kernels ``(*kernel_size, in_channels // groups, out_channels)`` (WIO, HWIO,
DHWIO). PyTorch is channels-first: from its ``Conv2d.weight`` of shape ``(out, in // groups, kh,
kw)``, fnn's ``w`` is ``weight.transpose(2, 3, 1, 0)``.

The convolution is the lesson's sliding filter, a cross-correlation (no kernel flip, as in every
deep-learning library)::

    y[b, o, f] = Σ_{k, c ∈ group(f)} xpad[b, o·s + k·d, c] · w[k, c mod C/G, f]

with strides ``s``, dilation ``d``, ``G`` feature groups and ``xpad`` the zero-padded input.
Its hand-derived backward, written out from that sum:

- input gradient: a *transposed* convolution of the error with the flipped kernel (in/out
  channels swapped inside each group): ``dy`` dilated by the strides, padded by
  ``d·(K-1) - pad_lo``, correlated with ``flip(w)``;
- kernel gradient: the correlation of the input with the error,
  ``dw[k, c, f] = Σ_{b, o} xpad[b, o·s + k·d, c] · dy[b, o, f]``.

``conv`` and ``conv_transpose`` are each other's adjoints, so each one's input gradient is the
other op applied to ``dy`` with the flipped, swapped kernel.

Kernel gradient formulation (``kernel_grad=``): ``"conv"`` hands the correlation to
``lax.conv_general_dilated`` (batch as the contracted axis); ``"im2col"`` gathers the ``prod(K)``
shifted input slices into one ``(B·out, prod(K)·C)`` matrix and multiplies it by the error
``(B·out, O)``. ``"auto"`` is chosen per platform when the program is lowered
(``jax.lax.platform_dependent``), not from the host's backend: a program exported for a GPU or
TPU from a CPU host carries the convolution form. On CPU the choice is a measured one
(:func:`kernel_grad_choice`, a choice point of :mod:`fnn.tuning`; it also decides the compiler
options of fnn's own compiled functions); with the tuner off, :data:`KERNEL_GRAD` decides
(measured in ``benchmarks/RESULTS.md``, "Convolution").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fnn import initializers as inits
from fnn.core import Example, Layer, constructor, default_dtype, examples, from_backward, is_shape
from fnn.layers._conv_forms import _conv_raw, _flip_swap, _input_grad, _kernel_grad, _pad
from fnn.layers._conv_tuning import _auto_input_grad, _auto_kernel_grad, kernel_grad_choice
from fnn.layers._param_shapes import check_param_shapes
from fnn.layers._spatial import (LAYOUTS, explicit_padding, int_tuple, padding_mode,
                                 padding_pairs, spatial_sizes)

__all__ = ["conv", "conv_backward", "conv_transpose", "conv_transpose_backward",
           "conv_output_shape", "conv_transpose_output_shape", "KERNEL_GRAD",
           "kernel_grad_choice",
           "Conv", "ConvTranspose"]

#: Kernel-gradient formulation per platform for ``kernel_grad="auto"`` (platforms not listed:
#: ``"conv"``, the library convolution, right for GPU/TPU; ``"gpu"`` stands for cuda and rocm).
#: The CPU entry is the tuner's default candidate (used with the tuner off), measured with
#: bench_conv.py: benchmarks/RESULTS.md, "Convolution" (im2col + matmul against XLA's CPU
#: convolution for the kernel gradient, under jaxlib's default compiler options).
KERNEL_GRAD = {"cpu": "im2col"}


# --------------------------------------------------------------------------- argument handling

def _check_x(name, x_shape, n, channels):
    """Rank and channel checks with a hint for channels-first input."""
    if len(x_shape) != n + 2:
        raise ValueError(f"{name}: expected input of rank {n + 2} {LAYOUTS[n]}, got shape "
                         f"{tuple(x_shape)}")
    if channels is not None and x_shape[-1] != channels:
        hint = (" — it looks channels-first; fnn convolutions take channels-last input "
                "(transpose NCHW to NHWC)") if x_shape[1] == channels else ""
        raise ValueError(f"{name}: expected {channels} input channels on the last axis, got "
                         f"shape {tuple(x_shape)}{hint}")


def _kernel_geometry(name, x_shape, w_shape, strides, dilation, groups):
    """Checks shared by convolution and its transpose: ``(n, strides, dilation, k_eff)``, with
    ``k_eff`` the dilated kernel sizes."""
    n = len(w_shape) - 2
    _check_x(name, x_shape, n, w_shape[-2] * groups)
    strides = int_tuple(name, "strides", strides, n)
    dilation = int_tuple(name, "dilation", dilation, n)
    if w_shape[-1] % groups:
        raise ValueError(f"{name}: {w_shape[-1]} output channels are not divisible by "
                         f"groups={groups}")
    return n, strides, dilation, [(k - 1) * d + 1 for k, d in zip(w_shape[:n], dilation)]


def conv_geometry(name, x_shape, w_shape, strides, padding, dilation, groups):
    """Check shapes; return ``(n, strides, dilation, pads, k_eff, out_sizes)``."""
    n, strides, dilation, k_eff = _kernel_geometry(name, x_shape, w_shape, strides, dilation,
                                                   groups)
    sizes = x_shape[1:-1]
    pads = padding_pairs(name, sizes, k_eff, strides, padding)
    for i, (m, k, (lo, hi)) in enumerate(zip(sizes, k_eff, pads)):
        if m + lo + hi < k:
            raise ValueError(f"{name}: kernel of effective size {k} (kernel {w_shape[i]}, dilation "
                             f"{dilation[i]}) is larger than the padded input ({m} + {lo} + {hi}) "
                             f"along spatial axis {i} (padding {padding!r}); input shape "
                             f"{tuple(x_shape)}")
    out = [(m + lo + hi - k) // s + 1 for m, (lo, hi), k, s in zip(sizes, pads, k_eff, strides)]
    return n, strides, dilation, pads, k_eff, out


# --------------------------------------------------------------------------- conv

def conv_output_shape(x_shape, w_shape, strides=1, padding="SAME", dilation=1, groups=1):
    """Output shape of :func:`conv`, with the same checks (``ValueError`` on bad shapes)."""
    *_, out = conv_geometry("conv", tuple(x_shape), tuple(w_shape), strides, padding, dilation,
                            groups)
    return (x_shape[0], *out, w_shape[-1])


def conv(x, w, strides=1, padding="SAME", dilation=1, groups=1):
    """N-d convolution (cross-correlation), channels-last, ``N = w.ndim - 2`` in 1..3.

    **Arguments:** ``x: [batch, *spatial, C]``; ``w: [*K, C // groups, O]``; ``strides`` and
    ``dilation``: int or one per spatial axis; ``padding``: ``"SAME"`` (output ``ceil(n/s)``,
    XLA/TF's split), ``"VALID"``, an int, ints or ``(lo, hi)`` pairs; ``groups``: feature groups
    (``groups == C`` is depthwise). **Returns:** ``[batch, *out, O]``.
    """
    _, strides, dilation, pads, _, _ = conv_geometry("conv", x.shape, w.shape, strides, padding,
                                                 dilation, groups)
    return _conv_raw(x, w, strides, pads, None, dilation, groups)


def conv_backward(x, w, dy, strides=1, padding="SAME", dilation=1, groups=1, kernel_grad="auto",
                  input_grad="auto"):
    """Hand-derived VJP of :func:`conv`: returns ``(dw, dx)``.

    ``dx`` is the transposed convolution of ``dy`` (dilated by the strides, padded by
    ``k_eff - 1 - lo`` and ``n + lo - ((out - 1)·s + 1)``) with the flipped, in/out-swapped
    kernel (``input_grad="conv"``), or the same sums as a matmul by the kernel as it is and a
    sum of shifted slices (``"col2im"``, one feature group); ``"auto"``: measured on CPU
    (:func:`fnn.layers._conv_tuning.input_grad_choice`), ``"conv"`` elsewhere. ``dw`` is the
    correlation of the padded input with ``dy`` (see module docstring).
    """
    _, strides, dilation, pads, k_eff, out = conv_geometry("conv", x.shape, w.shape, strides,
                                                           padding, dilation, groups)
    sizes, ksize = x.shape[1:-1], w.shape[:-2]
    span = [(o - 1) * s + 1 for o, s in zip(out, strides)]             # dilated error length
    if input_grad == "auto":
        input_grad = _auto_input_grad(x, w, strides, pads, dilation, groups)
    dx = _input_grad(dy, w, x.shape, strides, pads, dilation, groups, input_grad)
    used = [(lo, L + k - 1 - m - lo) for (lo, _), L, k, m in zip(pads, span, k_eff, sizes)]
    if kernel_grad == "auto":
        kernel_grad = _auto_kernel_grad("conv", x, w, strides, padding, dilation, groups)
    dw = _kernel_grad(_pad(x, used), dy, ksize, strides, dilation, groups, kernel_grad)
    return dw, dx


# --------------------------------------------------------------------------- conv_transpose

def transpose_geometry(name, x_shape, w_shape, strides, padding, dilation, groups):
    """Check shapes; return ``(n, strides, dilation, pads, k_eff, out_sizes)`` of the
    lhs-dilated convolution that a transposed convolution is."""
    n, strides, dilation, k_eff = _kernel_geometry(name, x_shape, w_shape, strides, dilation,
                                                   groups)
    mode = padding_mode(padding)
    if mode in ("SAME", "VALID"):      # lax.conv_transpose / Flax: out = n·s or (n-1)·s + k
        total = [k + s - 2 + (max(k - s, 0) if mode == "VALID" else 0)
                 for k, s in zip(k_eff, strides)]
        lo = [k - 1 if (mode == "VALID" or s > k - 1) else -(-t // 2)
              for k, s, t in zip(k_eff, strides, total)]
        pads = tuple((a, t - a) for a, t in zip(lo, total))
    elif mode is not None:
        raise ValueError(f"{name}: padding must be 'SAME', 'VALID' or explicit, got {padding!r}")
    else:
        pads = explicit_padding(name, padding, n)
    out = [(m - 1) * s + 1 + lo + hi - k + 1
           for m, s, (lo, hi), k in zip(x_shape[1:-1], strides, pads, k_eff)]
    if min(out) < 1:
        raise ValueError(f"{name}: padding {padding!r} leaves no output for input shape "
                         f"{tuple(x_shape)} and kernel {tuple(w_shape[:n])}")
    return n, strides, dilation, pads, k_eff, out


def conv_transpose_output_shape(x_shape, w_shape, strides=1, padding="SAME", dilation=1, groups=1):
    """Output shape of :func:`conv_transpose` (``ValueError`` on bad shapes)."""
    *_, out = transpose_geometry("conv_transpose", tuple(x_shape), tuple(w_shape), strides,
                                  padding, dilation, groups)
    return (x_shape[0], *out, w_shape[-1])


def conv_transpose(x, w, strides=1, padding="SAME", dilation=1, groups=1):
    """Transposed ("fractionally strided") convolution: ``x`` dilated by ``strides`` (``s - 1``
    zeros between cells), padded, then convolved with ``w`` at stride 1.

    **Arguments:** ``x: [batch, *spatial, C]``; ``w: [*K, C // groups, O]`` (Flax's
    ``ConvTranspose`` layout and semantics, ``transpose_kernel=False``); ``padding``: ``"SAME"``
    (output ``n·s``), ``"VALID"`` (``(n-1)·s + k_eff`` for ``k_eff >= s``) or explicit pairs
    applied to the dilated input. PyTorch's ``ConvTranspose`` with padding ``p`` and
    ``output_padding`` ``q`` is explicit ``(k_eff-1-p, k_eff-1-p+q)`` with its weight flipped
    spatially. **Returns:** ``[batch, *out, O]``.
    """
    _, strides, dilation, pads, _, _ = transpose_geometry("conv_transpose", x.shape, w.shape,
                                                           strides, padding, dilation, groups)
    return _conv_raw(x, w, (1,) * len(strides), pads, strides, dilation, groups)


def conv_transpose_backward(x, w, dy, strides=1, padding="SAME", dilation=1, groups=1,
                            kernel_grad="auto"):
    """Hand-derived VJP of :func:`conv_transpose`: returns ``(dw, dx)``.

    ``dx`` is the strided convolution of ``dy`` (padded by ``k_eff - 1 - lo``) with the flipped,
    in/out-swapped kernel; ``dw`` the correlation of the dilated, padded input with ``dy``.
    """
    _, strides, dilation, pads, k_eff, out = transpose_geometry(
        "conv_transpose", x.shape, w.shape, strides, padding, dilation, groups)
    sizes, ones = x.shape[1:-1], (1,) * len(strides)
    span = [(m - 1) * s + 1 for m, s in zip(sizes, strides)]           # dilated input length
    dx_pads = [(k - 1 - lo, L - o + lo) for k, (lo, _), L, o in zip(k_eff, pads, span, out)]
    dx = _conv_raw(dy, _flip_swap(w, groups), strides, dx_pads, None, dilation, groups)
    used = [(lo, o + k - 1 - L - lo) for (lo, _), o, k, L in zip(pads, out, k_eff, span)]
    xp = _pad(x, used, [s - 1 for s in strides])
    if kernel_grad == "auto":
        kernel_grad = _auto_kernel_grad("conv_transpose", x, w, strides, padding, dilation, groups)
    dw = _kernel_grad(xp, dy, w.shape[:-2], ones, dilation, groups, kernel_grad)
    return dw, dx


# --------------------------------------------------------------------------- layers

def _conv_layer(kind, op, op_backward, geometry, features, kernel_size, strides, padding,
                dilation, groups, use_bias, w_init, b_init, kernel_grad):
    ksize = spatial_sizes(kind, "kernel_size", kernel_size, "(3, 3)")
    n = len(ksize)
    if not isinstance(features, int) or features < 1 or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{kind}: features and groups must be positive ints, got "
                         f"features={features!r}, groups={groups!r}")
    if features % groups:
        raise ValueError(f"{kind}: features={features} is not divisible by groups={groups}")
    if kernel_grad not in ("auto", "conv", "im2col"):
        raise ValueError(f"{kind}: kernel_grad must be 'auto', 'conv' or 'im2col', "
                         f"got {kernel_grad!r}")
    strides = int_tuple(kind, "strides", strides, n)
    dilation = int_tuple(kind, "dilation", dilation, n)
    w_init = w_init or inits.he_normal()
    opts = dict(strides=strides, padding=padding, dilation=dilation, groups=groups)
    name = f"{kind}({features}, {ksize})"

    def init(key, input_shape):
        if not is_shape(input_shape):
            raise ValueError(f"{kind}: expected an input shape {LAYOUTS[n]}, got {input_shape}")
        _check_x(kind, input_shape, n, None)
        if input_shape[-1] % groups:
            raise ValueError(f"{kind}: {input_shape[-1]} input channels (last axis of shape "
                             f"{tuple(input_shape)}) are not divisible by groups={groups}")
        w_shape = (*ksize, input_shape[-1] // groups, features)
        *_, out = geometry(kind, tuple(input_shape), w_shape, **opts)
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, w_shape, default_dtype())}
        if use_bias:
            params["b"] = b_init(kb, (features,), default_dtype())
        return params, {}, (input_shape[0], *out, features)

    def _bias(b, y):
        return y + b.reshape((1,) * (y.ndim - 1) + b.shape)

    def check(params, x):
        geometry(kind, x.shape, params["w"].shape, **opts)
        w_shape = (*ksize, x.shape[-1] // groups, features)
        check_param_shapes(name, params, {"w": w_shape, "b": (features,)} if use_bias
                           else {"w": w_shape})

    def apply(params, state, x, *, key=None, train=False):
        check(params, x)
        y = op(x, params["w"], **opts)
        return (_bias(params["b"], y) if use_bias else y), state

    def backward(params, state, x, dy, *, key=None, train=False):
        check(params, x)
        dw, dx = op_backward(x, params["w"], dy, **opts, kernel_grad=kernel_grad)
        grads = {"w": dw}
        if use_bias:
            grads["b"] = jnp.sum(dy, axis=tuple(range(dy.ndim - 1)))
        return grads, dx

    return from_backward(init, apply, backward, name=name)


# The shared sweep's examples reuse a few input shapes (each new shape costs compilations);
# tests/test_conv.py covers depthwise, VALID, more strides and paddings.
@examples(Example((2, 7, 3), (4, (3,)), {"strides": 2}),
          Example((2, 5, 6, 4), (6, (3, 2)), {"dilation": (2, 1), "groups": 2}),
          Example((1, 4, 3, 5, 2), (3, (2, 2, 3)), {"padding": ((1, 0), (0, 1), 1),
                                                     "use_bias": False}))
@constructor
def Conv(features: int, kernel_size, strides=1, padding="SAME", dilation=1, groups: int = 1,
         use_bias: bool = True, *, w_init=None, b_init=inits.zeros,
         kernel_grad: str = "auto") -> Layer:
    """N-d convolution layer ``y = conv(x, w) + b`` (N = ``len(kernel_size)``, 1 to 3).

    **Arguments:** ``features``: output channels; ``kernel_size``: a tuple, one entry per spatial
    axis; ``strides``, ``padding``, ``dilation``, ``groups``: as :func:`conv`; ``w_init``: He
    normal by default (variance ``2 / fan_in``, ``fan_in = C/groups · prod(kernel_size)``);
    ``kernel_grad``: the backward's kernel-gradient formulation (``"auto"``, ``"conv"``,
    ``"im2col"``). **Params:** ``{"w": (*kernel_size, C // groups, features), "b": (features,)}``.
    **Input:** ``[batch, *spatial, C]`` → ``[batch, *out, features]``. Follows Flax's ``nn.Conv``
    (channels-last, default ``"SAME"``); PyTorch's ``ConvNd`` is channels-first with default
    padding 0 (``"VALID"``) and a uniform Kaiming init.
    """
    return _conv_layer("Conv", conv, conv_backward, conv_geometry, features, kernel_size, strides,
                       padding, dilation, groups, use_bias, w_init, b_init, kernel_grad)


@examples(Example((2, 5, 6, 4), (4, (3, 3)), {"strides": 2}),
          Example((2, 7, 3), (6, (4,)), {"strides": 3, "padding": "VALID", "dilation": 2,
                                         "groups": 3}))
@constructor
def ConvTranspose(features: int, kernel_size, strides=1, padding="SAME", dilation=1,
                  groups: int = 1, use_bias: bool = True, *, w_init=None, b_init=inits.zeros,
                  kernel_grad: str = "auto") -> Layer:
    """N-d transposed convolution layer ``y = conv_transpose(x, w) + b`` (upsampling by
    ``strides``; ``"SAME"`` gives ``n · strides``).

    **Arguments:** as :class:`Conv`; semantics as :func:`conv_transpose` (Flax's
    ``ConvTranspose``). **Params:** ``{"w": (*kernel_size, C // groups, features),
    "b": (features,)}``, He normal by default. **Input:** ``[batch, *spatial, C]`` →
    ``[batch, *out, features]``.
    """
    return _conv_layer("ConvTranspose", conv_transpose, conv_transpose_backward,
                       transpose_geometry, features, kernel_size, strides, padding, dilation,
                       groups, use_bias, w_init, b_init, kernel_grad)
