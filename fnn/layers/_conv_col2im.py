"""The convolution's input gradient as one matmul and a sum of shifted slices (col2im), the
adjoint of im2col: ``dy`` times the kernel gives each tap's contribution to the input, and each
is added back at its offset. The kernel is used as it is, ``(prod(K)·C, O)`` contracted over
``O``: the flipped, in/out-swapped copy the transposed convolution needs is never written —
in ResNet-18's last stage (512 × 512 × 3 × 3 kernels, 2x2 and 4x4 maps) that copy costs more
than the arithmetic (``benchmarks/RESULTS.md``). A candidate of the choice point
:func:`fnn.layers._conv_tuning.input_grad_choice` (CPU)."""
from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import lax

__all__ = ["conv_input_grad_col2im", "col2im_applies"]


def col2im_applies(pads, groups) -> bool:
    """Whether :func:`conv_input_grad_col2im` computes this convolution's input gradient: one
    feature group and no padding that crops (negative)."""
    return groups == 1 and all(lo >= 0 and hi >= 0 for lo, hi in pads)


def conv_input_grad_col2im(dy, w, x_shape, strides, pads, dilation):
    """``dx`` of ``y = conv(x, w)`` (one feature group, channels-last, ``pads`` the ``(lo, hi)``
    of each spatial axis, none negative)::

        dxpad[b, o·s + k·d, c] = Σ_k Σ_f dy[b, o, f] · w[k, c, f],   dx = dxpad[:, lo:lo + n]
    """
    n = w.ndim - 2
    ksize, c, o = w.shape[:n], w.shape[-2], w.shape[-1]
    out = dy.shape[1:-1]
    cols = lax.dot_general(dy.reshape(-1, o), w.reshape(-1, o), (((1,), (1,)), ((), ())))
    cols = cols.reshape(dy.shape[0], *out, math.prod(ksize), c)        # (B, *out, K, C)
    span = [(m - 1) * s + 1 for m, s in zip(out, strides)]
    size = [max(lo + m + hi, (k - 1) * d + sp)
            for (lo, hi), m, k, d, sp in zip(pads, x_shape[1:-1], ksize, dilation, span)]
    zero = jnp.zeros((), dy.dtype)
    dxp = None
    for t, k in enumerate(itertools.product(*(range(a) for a in ksize))):   # row-major taps
        start = [a * d for a, d in zip(k, dilation)]
        tap = lax.pad(cols[..., t, :], zero,
                      [(0, 0, 0)] + [(st, sz - st - sp, s - 1) for st, sz, sp, s
                                     in zip(start, size, span, strides)] + [(0, 0, 0)])
        dxp = tap if dxp is None else dxp + tap
    return dxp[(slice(None), *(slice(lo, lo + m) for (lo, _), m in zip(pads, x_shape[1:-1])),
                slice(None))]
