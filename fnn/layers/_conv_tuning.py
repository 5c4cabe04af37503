"""The convolution's kernel-gradient choice point (``kernel_grad="auto"`` of
:mod:`fnn.layers.conv`): measured on CPU by :mod:`fnn.tuning`, branched on per platform when the
program is lowered."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fnn import tuning

__all__ = ["kernel_grad_choice", "input_grad_choice", "in_a_loop"]

#: Part of every cached choice's key: raised when a candidate's formulation changes, so that
#: timings of the old one are not reused (2: the CPU ``"conv"`` form in the canonical layout).
_REVISION = 2


def kernel_grad_choice(op: str, x_shape, w_shape, dtype, strides=1, padding="SAME", dilation=1,
                       groups=1) -> str:
    """Choice point (:mod:`fnn.tuning`): the CPU kernel-gradient formulation of ``op``
    (``"conv"`` or ``"conv_transpose"``) at these shapes, ``"conv"`` or ``"im2col"``.

    Candidates, side by side: ``KERNEL_GRAD["cpu"]`` (the default) and the other form, each
    under every compiler-option set of :data:`fnn.tuning.OPTION_SETS` (jaxlib's defaults, and
    convolutions taken off YNNPACK). Each is timed as the layer's whole forward and backward
    (the options change the forward and the input gradient as well), run as the body of a
    two-step loop whose input changes each step, as ``fit``'s compiled epochs run it: XLA:CPU
    compiles a loop body differently (it lays out convolutions only outside loops, which
    :mod:`fnn.layers._conv_layout` now does by hand; before that the ``"conv"`` form of a 3×3
    convolution 32 → 64 on (32, 8, 8, 32) took 1.6 ms alone and 111 ms per loop step), so a
    choice timed outside a loop need not hold inside ``fit``.
    The answer is the fastest form under the options in effect for the function being traced,
    and :func:`fnn.tuning.jit` picks those options from the same timings. With the tuner off:
    ``KERNEL_GRAD["cpu"]``.
    """
    from fnn.layers import conv as C
    default = C.KERNEL_GRAD.get("cpu", "conv")
    if not tuning.enabled():
        return default
    fwd, bwd, out_shape = {"conv": (C.conv, C.conv_backward, C.conv_output_shape),
                           "conv_transpose": (C.conv_transpose, C.conv_transpose_backward,
                                              C.conv_transpose_output_shape)}[op]
    opts = dict(strides=strides, padding=padding, dilation=dilation, groups=groups)
    dy_shape = out_shape(x_shape, w_shape, **opts)

    def candidate(form, options):
        def once(x, w, dy):
            return fwd(x, w, **opts), bwd(x, w, dy, **opts, kernel_grad=form)
        name = form if options == "default" else f"{form}, {options}"
        return tuning.Candidate(name, in_a_loop(once), options, form)

    def make_args():
        r = np.random.default_rng(0)
        return tuple(r.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, dy_shape))
    key = {"op": op, "x": list(x_shape), "w": list(w_shape), "dtype": str(np.dtype(dtype)),
           **{k: repr(v) for k, v in opts.items()}, "timed": "in a loop",
           "revision": _REVISION}
    forms = (default, "im2col" if default == "conv" else "conv")
    return tuning.choose("conv.kernel_grad", key,
                         [candidate(f, o) for o in tuning.options.OPTION_SETS for f in forms], make_args)


def input_grad_choice(x_shape, w_shape, dtype, strides, pads, dilation) -> str:
    """Choice point (:mod:`fnn.tuning`): the CPU input-gradient formulation of a convolution
    with one feature group at these shapes (``strides``, ``pads`` as ``(lo, hi)`` pairs and
    ``dilation`` as tuples), ``"conv"`` (the default: the transposed convolution with the
    flipped, swapped kernel) or ``"col2im"`` (:mod:`fnn.layers._conv_col2im`: the kernel used as
    it is). Candidates: both forms under every compiler-option set, each timed alone in a
    two-step loop as :func:`kernel_grad_choice` times its own. With the tuner off: ``"conv"``."""
    from fnn.layers import conv as C
    from fnn.layers._conv_forms import _input_grad
    if not tuning.enabled():
        return "conv"
    dy_shape = C.conv_output_shape(x_shape, w_shape, strides, pads, dilation)

    def candidate(form, options):
        def once(x, w, dy):
            return _input_grad(dy, w, x.shape, strides, pads, dilation, 1, form)
        name = form if options == "default" else f"{form}, {options}"
        return tuning.Candidate(name, in_a_loop(once), options, form)

    def make_args():
        r = np.random.default_rng(0)
        return tuple(r.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, dy_shape))
    key = {"op": "conv", "x": list(x_shape), "w": list(w_shape), "dtype": str(np.dtype(dtype)),
           "strides": repr(strides), "padding": repr(pads), "dilation": repr(dilation),
           "timed": "in a loop"}
    return tuning.choose("conv.input_grad", key,
                         [candidate(f, o) for o in tuning.options.OPTION_SETS
                          for f in ("conv", "col2im")], make_args)


def _auto_input_grad(x, w, strides, pads, dilation, groups) -> dict:
    """``input_grad="auto"`` as ``{platform: form}``: the tuner's choice on CPU where col2im
    applies, ``"conv"`` elsewhere."""
    from fnn.layers._conv_col2im import col2im_applies
    pads = tuple(tuple(p) for p in pads)
    cpu = input_grad_choice(x.shape, w.shape, x.dtype, tuple(strides), pads, tuple(dilation)) \
        if col2im_applies(pads, groups) else "conv"
    return {"default": "conv", "cpu": cpu}


def in_a_loop(once):
    """``once(x, w, dy)`` as the body of a two-step ``fori_loop`` whose ``x`` changes each step
    (``x + i·1e-30``: the same numbers, but nothing of the body can be hoisted out of the loop),
    returning the last step's result: what the tuner times, as ``fit``'s epochs run it."""
    def run(x, w, dy):
        def step(i, out):
            return once(x + (i * 1e-30).astype(x.dtype), w, dy)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                             jax.eval_shape(once, x, w, dy))
        return jax.lax.fori_loop(0, 2, step, zeros)
    return run


_PLATFORM_NAMES = {"gpu": ("cuda", "rocm")}


def _auto_kernel_grad(op, x, w, strides, padding, dilation, groups) -> dict:
    """``kernel_grad="auto"`` as ``{platform: form}``, branched on at lowering time: the
    tuner's (or the table's) CPU choice, the table's other entries, ``"conv"`` elsewhere."""
    from fnn.layers import conv as C
    forms = {"default": "conv"}
    for platform, form in C.KERNEL_GRAD.items():
        for name in _PLATFORM_NAMES.get(platform, (platform,)):
            forms[name] = form
    forms["cpu"] = kernel_grad_choice(op, x.shape, w.shape, x.dtype, strides, padding, dilation,
                                      groups)
    return forms
