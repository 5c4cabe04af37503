"""Pooling in 1, 2 and 3 spatial dimensions: ``MaxPool``, ``AvgPool``, ``GlobalAvgPool``,
``GlobalMaxPool`` — ops, hand-derived backward, layers.

Channels-last input ``(batch, *spatial, channels)``; the window slides over the spatial axes only
(``window`` has one entry per spatial axis, so its length sets the dimension). Windows are taken
at ``o·s + k`` on the padded input, ``k`` running over the window in row-major order.

Backward, written out:

- max pool routes each output's error to the position of its window's maximum. **Ties:** the
  *first* maximum in row-major window order takes the whole error (the others get none), which
  is also what XLA's ``select_and_scatter`` does under ``jax.grad``. Padded cells hold ``-inf``
  and never win unless a window is all padding (its output is ``-inf`` and its error is dropped).
- average pool spreads each output's error evenly, ``dy / count``, over its window's cells.
- overlapping windows (stride < window) accumulate: a cell's gradient is the sum over every
  window it belongs to.

Padding cells in an average: ``count_include_pad=True`` (default, as PyTorch's ``AvgPool2d`` and
Flax's ``avg_pool``) divides by the full window size; ``False`` divides by the number of real
cells (TensorFlow's ``SAME`` average pooling).
"""
from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from fnn.core import Example, Layer, constructor, examples, from_backward, is_shape
from fnn.layers.conv import _conv_pads, _tuple

__all__ = ["max_pool", "max_pool_backward", "avg_pool", "avg_pool_backward",
           "pool_output_shape", "MaxPool", "AvgPool", "GlobalAvgPool", "GlobalMaxPool"]

_NAMES = {1: "(batch, width, channels)", 2: "(batch, height, width, channels)",
          3: "(batch, depth, height, width, channels)"}


def _window(name, window):
    if isinstance(window, int) or not window or len(tuple(window)) not in (1, 2, 3):
        raise ValueError(f"{name}: window must be a tuple with one entry per spatial axis "
                         f"(1 to 3 entries, e.g. (2, 2) for images), got {window!r}")
    return _tuple(name, "window", window, len(tuple(window)))


def _geometry(name, x_shape, window, strides, padding):
    """Check shapes; return ``(window, strides, pads, out_sizes)``."""
    window = _window(name, window)
    n = len(window)
    strides = window if strides is None else _tuple(name, "strides", strides, n)
    if len(x_shape) != n + 2:
        raise ValueError(f"{name}: expected input of rank {n + 2} {_NAMES[n]} for a window of "
                         f"{n} axes, got shape {tuple(x_shape)}")
    sizes = tuple(x_shape[1:-1])
    pads = _conv_pads(name, sizes, window, strides, padding)
    for i, (m, k, (lo, hi)) in enumerate(zip(sizes, window, pads)):
        if m + lo + hi < k:
            raise ValueError(f"{name}: window {k} is larger than the padded input ({m} + {lo} + "
                             f"{hi}) along spatial axis {i} (padding {padding!r}); input shape "
                             f"{tuple(x_shape)}")
    out = tuple((m + lo + hi - k) // s + 1 for m, (lo, hi), k, s in zip(sizes, pads, window,
                                                                         strides))
    return window, strides, pads, out


def pool_output_shape(x_shape, window, strides=None, padding="VALID"):
    """Output shape of :func:`max_pool` / :func:`avg_pool` (``ValueError`` on bad shapes)."""
    *_, out = _geometry("pool", tuple(x_shape), window, strides, padding)
    return (x_shape[0], *out, x_shape[-1])


def _reduce(x, init, op, window, strides, pads):
    init = np.asarray(init, x.dtype)            # a concrete init keeps reduce_window autodiff-able
    return lax.reduce_window(x, init, op, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *pads, (0, 0)))


def _pad(x, value, pads, interior=None):
    interior = interior or (0,) * len(pads)
    return lax.pad(x, jnp.asarray(value, x.dtype),
                   [(0, 0, 0)] + [(lo, hi, i) for (lo, hi), i in zip(pads, interior)] + [(0, 0, 0)])


def _taps(window):
    return list(itertools.product(*(range(k) for k in window)))


def _window_slices(xp, window, strides, out):
    """The input cell at tap ``k`` of every window: ``prod(window)`` arrays ``(B, *out, C)``."""
    res = []
    for k in _taps(window):
        limit = [a + (o - 1) * s + 1 for a, o, s in zip(k, out, strides)]
        res.append(lax.slice(xp, (0, *k, 0), (xp.shape[0], *limit, xp.shape[-1]),
                             (1, *strides, 1)))
    return res


def _place(part, k, strides, total, out):
    """Put ``part (B, *out, C)`` at cells ``o·s + k`` of a zero grid of spatial size ``total``."""
    span = [(o - 1) * s + 1 for o, s in zip(out, strides)]
    return _pad(part, 0, [(a, t - a - L) for a, t, L in zip(k, total, span)],
                [s - 1 for s in strides])


def _unpad(dxp, pads):
    return _pad(dxp, 0, [(-lo, -hi) for lo, hi in pads])


# --------------------------------------------------------------------------- max pool

def max_pool(x, window, strides=None, padding="VALID"):
    """Max pooling: ``y[b, o, c] = max_k xpad[b, o·s + k, c]`` (padding cells are ``-inf``).

    **Arguments:** ``x: [batch, *spatial, C]``; ``window``: tuple, one entry per spatial axis;
    ``strides``: default ``window`` (non-overlapping); ``padding``: ``"VALID"`` (default, as
    PyTorch), ``"SAME"``, an int, ints or ``(lo, hi)`` pairs. **Returns:** ``[batch, *out, C]``.
    """
    window, strides, pads, _ = _geometry("max_pool", x.shape, window, strides, padding)
    return _reduce(x, -jnp.inf, lax.max, window, strides, pads)


def max_pool_backward(x, dy, window, strides=None, padding="VALID"):
    """Hand-derived VJP of :func:`max_pool`: ``dx``. Each window's error goes to its first
    maximum in row-major window order; overlapping windows accumulate."""
    window, strides, pads, out = _geometry("max_pool", x.shape, window, strides, padding)
    xp = _pad(x, -jnp.inf, pads)
    taps = jnp.stack(_window_slices(xp, window, strides, out))        # (K, B, *out, C)
    first = jnp.argmax(taps, axis=0)                                  # first max wins ties
    total = xp.shape[1:-1]
    dxp = sum(_place(jnp.where(first == i, dy, 0), k, strides, total, out)
              for i, k in enumerate(_taps(window)))
    return _unpad(dxp, pads)


# --------------------------------------------------------------------------- average pool

def _count(x_shape, dtype, window, strides, pads, include_pad):
    """Cells averaged per output, shape ``(1, *out, 1)``."""
    if include_pad:
        return jnp.full((1,) * len(x_shape), math.prod(window), dtype)
    ones = jnp.ones((1, *x_shape[1:-1], 1), dtype)
    return _reduce(ones, 0, lax.add, window, strides, pads)


def avg_pool(x, window, strides=None, padding="VALID", count_include_pad=True):
    """Average pooling: ``y[b, o, c] = Σ_k xpad[b, o·s + k, c] / count``.

    ``count`` is ``prod(window)`` with ``count_include_pad=True`` (PyTorch's and Flax's default:
    zero padding counts), else the number of real cells in the window. Arguments as
    :func:`max_pool`. **Returns:** ``[batch, *out, C]``.
    """
    window, strides, pads, _ = _geometry("avg_pool", x.shape, window, strides, padding)
    total = _reduce(x, 0, lax.add, window, strides, pads)
    return total / _count(x.shape, x.dtype, window, strides, pads, count_include_pad)


def avg_pool_backward(x, dy, window, strides=None, padding="VALID", count_include_pad=True):
    """Hand-derived VJP of :func:`avg_pool`: ``dx``; each cell of a window receives
    ``dy / count``, accumulated over overlapping windows."""
    window, strides, pads, out = _geometry("avg_pool", x.shape, window, strides, padding)
    share = dy / _count(x.shape, dy.dtype, window, strides, pads, count_include_pad)
    total = [m + lo + hi for m, (lo, hi) in zip(x.shape[1:-1], pads)]
    dxp = sum(_place(share, k, strides, total, out) for k in _taps(window))
    return _unpad(dxp, pads)


# --------------------------------------------------------------------------- layers

def _pool_layer(kind, op, op_backward, window, strides, padding, **extra):
    window = _window(kind, window)
    strides = None if strides is None else _tuple(kind, "strides", strides, len(window))

    def init(key, input_shape):
        if not is_shape(input_shape):
            raise ValueError(f"{kind}: expected an input shape {_NAMES[len(window)]}, "
                             f"got {input_shape}")
        *_, out = _geometry(kind, tuple(input_shape), window, strides, padding)
        return {}, {}, (input_shape[0], *out, input_shape[-1])

    def apply(params, state, x, *, key=None, train=False):
        _geometry(kind, x.shape, window, strides, padding)
        return op(x, window, strides, padding, **extra), state

    def backward(params, state, x, dy, *, key=None, train=False):
        _geometry(kind, x.shape, window, strides, padding)
        return {}, op_backward(x, dy, window, strides, padding, **extra)

    return from_backward(init, apply, backward, name=f"{kind}({window})")


@examples(Example((2, 5, 6, 4), ((2, 2),)),        # input shapes shared with Conv's examples
          Example((1, 4, 3, 5, 2), ((2, 3, 2), (1, 2, 1), ((1, 0), 1, (0, 1)))))
@constructor
def MaxPool(window, strides=None, padding="VALID") -> Layer:
    """Max pooling layer (see :func:`max_pool`): ``[batch, *spatial, C] → [batch, *out, C]``.

    ``strides`` defaults to ``window``; padding defaults to ``"VALID"`` (PyTorch's
    ``MaxPool2d``/Flax's ``max_pool`` conventions). Backward: the first maximum of each window
    (row-major order) takes the error. No params.
    """
    return _pool_layer("MaxPool", max_pool, max_pool_backward, window, strides, padding)


@examples(Example((2, 5, 6, 4), ((3, 2), (2, 1), "SAME"), {"count_include_pad": False}),
          Example((2, 7, 3), ((3,), 2, "SAME")))
@constructor
def AvgPool(window, strides=None, padding="VALID", count_include_pad: bool = True) -> Layer:
    """Average pooling layer (see :func:`avg_pool`): ``[batch, *spatial, C] → [batch, *out, C]``.

    ``count_include_pad=True`` (default, PyTorch/Flax): zero padding counts in the divisor;
    ``False``: only real cells count (TensorFlow's ``SAME``). No params.
    """
    return _pool_layer("AvgPool", avg_pool, avg_pool_backward, window, strides, padding,
                       count_include_pad=count_include_pad)


def _global_layer(kind, forward, backward_fn):
    def _check(shape):
        if not is_shape(tuple(shape)) or len(shape) < 3:
            raise ValueError(f"{kind}: expected input of rank >= 3 (batch, *spatial, channels), "
                             f"got shape {tuple(shape) if is_shape(tuple(shape)) else shape}")

    def init(key, input_shape):
        _check(input_shape)
        return {}, {}, (input_shape[0], input_shape[-1])

    def apply(params, state, x, *, key=None, train=False):
        _check(x.shape)
        return forward(x.reshape(x.shape[0], -1, x.shape[-1])), state     # (B, S, C) -> (B, C)

    def backward(params, state, x, dy, *, key=None, train=False):
        _check(x.shape)
        return {}, backward_fn(x.reshape(x.shape[0], -1, x.shape[-1]), dy).reshape(x.shape)

    return from_backward(init, apply, backward, name=kind)


@examples(Example((2, 5, 6, 4)))
@constructor
def GlobalAvgPool() -> Layer:
    """Mean over all spatial axes: ``[batch, *spatial, C] → [batch, C]``.

    Backward: ``dx = dy / S`` at every position (``S`` spatial cells). No params.
    """
    return _global_layer("GlobalAvgPool", lambda x: jnp.mean(x, axis=1),
                         lambda x, dy: jnp.broadcast_to((dy / x.shape[1])[:, None, :], x.shape))


def _global_max_backward(x, dy):
    first = jnp.argmax(x, axis=1)                                     # (B, C), first max wins
    hit = jnp.arange(x.shape[1])[None, :, None] == first[:, None, :]  # (B, S, C)
    return jnp.where(hit, dy[:, None, :], 0)


@examples(Example((2, 7, 3)))
@constructor
def GlobalMaxPool() -> Layer:
    """Max over all spatial axes: ``[batch, *spatial, C] → [batch, C]``.

    Backward: each channel's error goes to the first maximum (in row-major spatial order).
    """
    return _global_layer("GlobalMaxPool", lambda x: jnp.max(x, axis=1), _global_max_backward)
