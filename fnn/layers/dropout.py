"""Dropout: ``Dropout`` and ``SpatialDropout`` — plain op, hand-derived backward, layers.

Inverted dropout (Srivastava et al. 2014, as PyTorch and Flax): in training each entry is kept
with probability ``1 − rate`` and scaled by ``1 / (1 − rate)``, so ``E[y] = x`` and evaluation is
the identity. The mask comes from an explicit ``jax.random`` key; ``backward`` draws it again from
the same key, so forward and backward agree, and the layer's ``fwd`` keeps it as its residual
(one byte an entry) so the hand path draws it once::

    y = m ⊙ x / (1 − rate),   dx = m ⊙ dy / (1 − rate),   m ~ Bernoulli(1 − rate)
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from fnn.core import Example, Layer, constructor, examples, is_shape

__all__ = ["dropout_mask", "dropout", "dropout_backward", "Dropout", "SpatialDropout"]


def _check_rate(name, rate):
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
        raise ValueError(f"{name}: rate must be a number in [0, 1], got {rate!r}")


def _mask_shape(x_shape, broadcast_axes) -> tuple:
    axes = {a % len(x_shape) for a in broadcast_axes}
    return tuple(1 if i in axes else d for i, d in enumerate(x_shape))


def dropout_mask(key, rate: float, shape) -> jax.Array:
    """Boolean keep-mask of ``shape``: each entry ``True`` with probability ``1 − rate``."""
    _check_rate("dropout_mask", rate)
    return jax.random.bernoulli(key, 1.0 - rate, tuple(shape))


def dropout(key, rate: float, x, broadcast_axes=()):
    """Inverted dropout: ``y = m ⊙ x / (1 − rate)``, ``m ~ Bernoulli(1 − rate)``.

    **Arguments:** ``key``: a ``jax.random`` key; ``rate``: drop probability in ``[0, 1]``
    (``rate=1`` gives zeros); ``x: [...]``; ``broadcast_axes``: axes along which one mask value is
    shared (Flax's ``broadcast_dims``; spatial axes give spatial dropout).
    **Returns:** ``y`` shaped like ``x``.
    """
    _check_rate("dropout", rate)
    if rate == 1:
        return jnp.zeros_like(x)
    keep = dropout_mask(key, rate, _mask_shape(x.shape, broadcast_axes))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def dropout_backward(key, rate: float, dy, broadcast_axes=()):
    """VJP of :func:`dropout` (linear in ``x``): ``dx = m ⊙ dy / (1 − rate)`` with the same mask."""
    return dropout(key, rate, dy, broadcast_axes)


def _dropout_layer(name, rate, min_rank, broadcast_axes) -> Layer:
    """Dropout layer; ``broadcast_axes(ndim)`` names the axes sharing one mask value."""
    _check_rate(name, rate)

    def check_shape(shape):
        if len(shape) < min_rank:
            raise ValueError(f"{name}: expected input of rank >= {min_rank} "
                             f"{'(batch, *spatial, channels)' if min_rank > 2 else '(batch, ...)'}"
                             f", got shape {tuple(shape)}")

    def check(x):
        if not hasattr(x, "shape"):
            raise TypeError(f"{name}: expected an array input, got {type(x).__name__}")
        check_shape(x.shape)

    def init(key, input_shape):
        if not is_shape(input_shape):
            raise ValueError(f"{name}: expected an input shape (batch, ...), got {input_shape}")
        check_shape(input_shape)
        return {}, {}, tuple(input_shape)

    def keep_mask(x, key, train):
        """The boolean keep-mask, or ``None`` where the map is the identity or zero."""
        if not train:
            return None
        if key is None:
            raise ValueError(f"{name}: train=True needs a key; pass key=jax.random.PRNGKey(...) "
                             f"to apply and backward (the same key in both)")
        if rate in (0, 1):
            return None
        return dropout_mask(key, rate, _mask_shape(x.shape, broadcast_axes(x.ndim)))

    def run(a, keep, train):                 # the map, linear: dy goes through it as x does
        if not train or rate == 0:
            return a
        if rate == 1:
            return jnp.zeros_like(a)
        return jnp.where(keep, a / (1.0 - rate), jnp.zeros((), a.dtype))

    def apply(params, state, x, *, key=None, train=False):
        return fwd(params, state, x, key=key, train=train)[:2]

    def fwd(params, state, x, *, key=None, train=False):
        check(x)
        keep = keep_mask(x, key, train)
        # the input's shape rides along as a zero-size array (no bytes), for bwd's check
        shape = jnp.zeros((*x.shape, 0), jnp.bool_)
        return run(x, keep, train), state, ((() if keep is None else keep), shape)

    def bwd(params, state, res, dy, *, key=None, train=False):
        keep, shape = res
        check(dy)
        if tuple(dy.shape) != shape.shape[:-1]:
            raise ValueError(f"{name}: dy shape {tuple(dy.shape)} differs from the input shape "
                             f"{shape.shape[:-1]}")
        return {}, run(dy, keep, train)

    return Layer(init, apply, fwd, bwd, name, stochastic=True)


@examples(Example((4, 5), (0.5,)), Example((2, 3, 4), (0.2,)))
@constructor
def Dropout(rate: float) -> Layer:
    """Inverted dropout: in training keep each entry with probability ``1 − rate``, scaled by
    ``1 / (1 − rate)``; identity when ``train=False`` (PyTorch ``nn.Dropout(p=rate)``, Flax).

    ``train=True`` needs a ``key`` (even at ``rate=0``, so a model fails the same way for every
    rate); ``backward`` with the same key reuses the mask. ``[batch, ...]`` → same; no params.
    """
    return _dropout_layer(f"Dropout({rate})", rate, 2, lambda ndim: ())


@examples(Example((2, 4, 4, 3), (0.5,)), Example((3, 5, 4), (0.25,)))
@constructor
def SpatialDropout(rate: float) -> Layer:
    """Spatial dropout (Tompson et al. 2015): drops whole channels of ``[batch, *spatial, c]``
    features, one mask value per ``(example, channel)`` shared over the spatial axes (mask shape
    ``(batch, 1, ..., 1, c)``), scaled by ``1 / (1 − rate)``. Keras ``SpatialDropout1D/2D/3D``;
    PyTorch ``nn.Dropout2d`` on channels-first input. Keys and modes as :func:`Dropout`.
    """
    return _dropout_layer(f"SpatialDropout({rate})", rate, 3,
                          lambda ndim: tuple(range(1, ndim - 1)))
