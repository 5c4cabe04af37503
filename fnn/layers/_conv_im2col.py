"""The convolution as one matmul of shifted input slices (im2col), for inputs smaller than the
kernel: there XLA:CPU's convolution is 25-75x slower (ResNet-18's last stage, 2x2 maps and 3x3
kernels: ``benchmarks/RESULTS.md``), and the patches, ``prod(K)`` times the padded input, are
small. Used by :func:`fnn.layers.conv._conv_raw` on CPU (the forward and the input gradient)."""
from __future__ import annotations

import itertools

import jax.numpy as jnp
from jax import lax

__all__ = ["conv_im2col"]


def conv_im2col(x, w, strides, pads, lhs_dilation, dilation):
    """``lax.conv_general_dilated(x, w, strides, pads, lhs_dilation, dilation)`` with one feature
    group, channels-last (``x: (B, *S, C)``, ``w: (*K, C, O)``): the ``prod(K)`` shifted, strided
    slices of the padded (and ``lhs_dilation``-dilated) input side by side, ``(B·out,
    prod(K)·C)``, times ``w`` as ``(prod(K)·C, O)``. Negative pads crop, as in XLA."""
    n = w.ndim - 2
    interior = [d - 1 for d in (lhs_dilation or (1,) * n)]
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 [(0, 0, 0)] + [(lo, hi, i) for (lo, hi), i in zip(pads, interior)] + [(0, 0, 0)])
    ksize, c = w.shape[:n], xp.shape[-1]
    out = [(m - (k - 1) * d - 1) // s + 1
           for m, k, d, s in zip(xp.shape[1:-1], ksize, dilation, strides)]
    cols = []
    for k in itertools.product(*(range(a) for a in ksize)):     # one slice per tap, row-major
        start = [a * d for a, d in zip(k, dilation)]
        limit = [a + (o - 1) * s + 1 for a, o, s in zip(start, out, strides)]
        cols.append(lax.slice(xp, (0, *start, 0), (xp.shape[0], *limit, c), (1, *strides, 1)))
    patches = jnp.concatenate(cols, axis=-1)                          # (B, *out, prod(K)·C)
    y = patches.reshape(-1, patches.shape[-1]) @ w.reshape(-1, w.shape[-1])
    return y.reshape(*patches.shape[:-1], w.shape[-1])
