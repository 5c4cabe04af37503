"""The convolution's formulations, side by side: the library convolution (with the im2col
matmul where the kernel is larger than the input), the input gradient (``"conv"``: the
transposed convolution with the flipped, swapped kernel; ``"col2im"``) and the kernel gradient
(``"conv"``: the correlation of input and error, laid out for XLA:CPU; ``"im2col"``). Chosen in
:mod:`fnn.layers.conv` (``kernel_grad=``, ``input_grad=``; ``"auto"``: by
:mod:`fnn.layers._conv_tuning`)."""
from __future__ import annotations

import functools
import itertools
import math

import jax.numpy as jnp
from jax import lax

from fnn.layers._conv_col2im import col2im_applies, conv_input_grad_col2im
from fnn.layers._conv_im2col import conv_im2col
from fnn.layers._conv_layout import canonical_convs

_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _dims(n):
    s = _SPATIAL[n]
    return (f"N{s}C", f"{s}IO", f"N{s}C")


def _conv_raw(x, w, strides, pads, lhs_dilation, dilation, groups):
    """The convolution (forward, and the input gradient: ``lhs_dilation`` = the strides). On
    CPU, when the kernel is larger than the input along an axis (ResNet's last stage: 2x2 maps,
    3x3 kernels), XLA's convolution is 25-75x slower than an im2col matmul, whose patches are
    small exactly then (``benchmarks/RESULTS.md``, ResNet-18): that one is used there."""
    xla = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=pads,
                            lhs_dilation=lhs_dilation, rhs_dilation=dilation,
                            dimension_numbers=_dims(w.ndim - 2), feature_group_count=groups)
    k_eff = [(k - 1) * d + 1 for k, d in zip(w.shape[:-2], dilation)]
    if groups != 1 or all(m >= k for m, k in zip(x.shape[1:-1], k_eff)):
        return xla(x, w)
    small = functools.partial(conv_im2col, strides=strides, pads=pads,
                              lhs_dilation=lhs_dilation, dilation=dilation)
    return lax.platform_dependent(x, w, cpu=small, default=xla)


def _input_grad(dy, w, x_shape, strides, pads, dilation, groups, method):
    """``dx`` of :func:`conv` by ``method``: ``"conv"``, ``"col2im"``, or ``{platform: method}``
    (chosen at lowering)."""
    if isinstance(method, dict):
        forms = {p: functools.partial(_input_grad, x_shape=x_shape, strides=strides, pads=pads,
                                      dilation=dilation, groups=groups, method=m)
                 for p, m in method.items()}
        return lax.platform_dependent(dy, w, **forms) if len(set(method.values())) > 1 else \
            forms["default"](dy, w)
    if method == "col2im":
        if not col2im_applies(pads, groups):
            raise ValueError(f"conv: input_grad='col2im' needs one feature group and no "
                             f"negative padding, got groups={groups}, padding {tuple(pads)}; "
                             f"use 'auto' or 'conv'")
        return conv_input_grad_col2im(dy, w, x_shape, strides, pads, dilation)
    if method != "conv":
        raise ValueError(f"conv: input_grad must be 'auto', 'conv' or 'col2im', got {method!r}")
    k_eff = [(k - 1) * d + 1 for k, d in zip(w.shape[:-2], dilation)]
    span = [(o - 1) * s + 1 for o, s in zip(dy.shape[1:-1], strides)]
    dx_pads = [(k - 1 - lo, m + lo - L) for k, (lo, _), m, L in zip(k_eff, pads, x_shape[1:-1],
                                                                     span)]
    return _conv_raw(dy, _flip_swap(w, groups), (1,) * len(k_eff), dx_pads, strides, dilation,
                     groups)


def _flip_swap(w, groups):
    """``(*K, Ci/G, Co) -> (*K, Co/G, Ci)``: spatially flipped, in/out swapped within each group."""
    *k, ci_g, co = w.shape
    n = len(k)
    w = jnp.flip(w, axis=tuple(range(n))).reshape(*k, ci_g, groups, co // groups)
    w = jnp.transpose(w, tuple(range(n)) + (n + 2, n + 1, n))       # (*K, Co/G, G, Ci/G)
    return w.reshape(*k, co // groups, groups * ci_g)


# --------------------------------------------------------------------------- kernel gradient

def _pad(x, pads, interior=None):
    """Zero-pad the spatial axes of ``(B, *S, C)``; negative ``hi`` crops."""
    interior = interior or (0,) * len(pads)
    return lax.pad(x, jnp.zeros((), x.dtype),
                   [(0, 0, 0)] + [(lo, hi, i) for (lo, hi), i in zip(pads, interior)] + [(0, 0, 0)])


def _kernel_grad(xp, dy, ksize, strides, dilation, groups, method):
    """``dw[k, c, f] = Σ_{b,o} xp[b, o·s + k·d, c] · dy[b, o, f]`` on a padded input ``xp``;
    ``method``: ``"conv"``, ``"im2col"``, or ``{platform: method}`` (chosen at lowering)."""
    if isinstance(method, dict):
        forms = {p: functools.partial(_kernel_grad, ksize=ksize, strides=strides,
                                      dilation=dilation, groups=groups, method=m)
                 for p, m in method.items()}
        if len(set(method.values())) == 1:
            return forms["default"](xp, dy)
        return lax.platform_dependent(xp, dy, **forms)
    n, out, co = len(ksize), dy.shape[1:-1], dy.shape[-1]
    ci = xp.shape[-1]
    if method == "conv":           # batch is the contracted axis, channels the "batch"
        s = _SPATIAL[n]
        corr = functools.partial(lax.conv_general_dilated, window_strides=dilation,
                                 padding=[(0, 0)] * n, rhs_dilation=strides,
                                 dimension_numbers=(f"C{s}N", f"I{s}O", f"{s}NC"),
                                 batch_group_count=groups)
        return canonical_convs(corr)(xp, dy)    # laid out for XLA:CPU, or slow in a loop
    if method != "im2col":
        raise ValueError(f"conv: kernel_grad must be 'auto', 'conv' or 'im2col', got {method!r}")
    cols = []
    for k in itertools.product(*(range(a) for a in ksize)):    # one shifted slice per tap
        start = [a * d for a, d in zip(k, dilation)]
        limit = [a + (o - 1) * s + 1 for a, o, s in zip(start, out, strides)]
        cols.append(lax.slice(xp, (0, *start, 0), (xp.shape[0], *limit, ci), (1, *strides, 1)))
    m, kk = math.prod(dy.shape[:-1]), math.prod(ksize)
    patches = jnp.concatenate(cols, axis=-1).reshape(m, kk, groups, ci // groups)  # (M, K, G, C/G)
    err = dy.reshape(m, groups, co // groups)                                       # (M, G, O/G)
    dw = jnp.einsum("mkgc,mgo->kcgo", patches, err)                           # (K, C/G, G, O/G)
    return dw.reshape(*ksize, ci // groups, co)
