"""The normalization machinery shared by ``norm.py`` (layer, RMS, instance, group norm) and
``batch_norm.py``: standardize over *reduction* axes, the affine map on *feature* axes, their
hand-derived backward, statistics in at least float32, and the parameter checks of the layers.
The maths is in ``fnn/layers/norm.py``'s docstring. Private: imported by those two modules only.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fnn.core import default_dtype


# --------------------------------------------------------------------------- axes

def axes_of(name, ndim, axis) -> tuple:
    """``axis`` (int or tuple) as sorted non-negative ints, checked against ``ndim``."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or any(not isinstance(a, int) or not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{name}: axis {axis!r} is out of range for an input of rank {ndim}")
    axes = tuple(sorted(a % ndim for a in axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}: axis {axis!r} repeats an axis")
    return axes


def other_axes(ndim, axes) -> tuple:
    """The axes of a rank-``ndim`` array not in ``axes``."""
    return tuple(i for i in range(ndim) if i not in axes)


def broadcast_shape(x_shape, axes) -> tuple:
    """Shape that broadcasts a ``[x_shape[a] for a in axes]`` array against ``x``."""
    return tuple(d if i in axes else 1 for i, d in enumerate(x_shape))


# --------------------------------------------------------------------------- the maths

def standardize(x, axes, eps, center=True):
    """``(x̂, 1/σ)`` over ``axes`` (``1/σ`` keeps dims); ``center=False`` is RMS scaling."""
    if center:
        x = x - jnp.mean(x, axes, keepdims=True)
    inv = lax.rsqrt(jnp.mean(x * x, axes, keepdims=True) + eps)
    return x * inv, inv


def standardize_backward(xhat, inv, dxhat, axes, center=True):
    """``dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / σ`` over ``axes``."""
    d = dxhat - xhat * jnp.mean(dxhat * xhat, axes, keepdims=True)
    if center:
        d = d - jnp.mean(dxhat, axes, keepdims=True)
    return d * inv


def affine(xhat, scale, offset, feat):
    """``scale·x̂ + offset`` with ``scale``/``offset`` (or ``None``) over the axes ``feat``."""
    bs = broadcast_shape(xhat.shape, feat)
    y = xhat if scale is None else xhat * scale.reshape(bs)
    return y if offset is None else y + offset.reshape(bs)


def affine_backward(xhat, scale, dy, feat):
    """``(dscale or None, doffset, dx̂)`` of ``y = scale·x̂ + offset``."""
    rest = other_axes(dy.ndim, feat)
    dscale = None if scale is None else jnp.sum(dy * xhat, rest)
    dxhat = dy if scale is None else dy * scale.reshape(broadcast_shape(dy.shape, feat))
    return dscale, jnp.sum(dy, rest), dxhat


def standardized(x, red, feat, eps, center, stats):
    """``(x̂, 1/σ)``: from the statistics over ``red``, or from given ``stats = (mean, var)``."""
    if stats is None:
        return standardize(x, red, eps, center)
    bs = broadcast_shape(x.shape, feat)
    inv = lax.rsqrt(stats[1].reshape(bs) + eps)
    return (x - stats[0].reshape(bs)) * inv, inv


def at_least_f32(x):
    """``x`` in at least float32: statistics of bfloat16/float16 inputs are taken in float32."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cast_grads(grads, scale, dy):
    """``(dscale, doffset, dx)`` back to the dtypes of ``scale`` and ``dy``."""
    dscale, doffset, dx = grads
    return (None if dscale is None else dscale.astype(scale.dtype), doffset.astype(dy.dtype),
            dx.astype(dy.dtype))


def normalize_fwd(x, scale, offset, red, feat, eps, center=True, stats=None):
    """Standardize over ``red`` (or with fixed ``stats``), then the affine map on ``feat``.
    Returns ``(y, (x̂, 1/σ))``; ``x̂`` and ``1/σ`` in at least float32, ``y`` in ``x``'s dtype."""
    xhat, inv = standardized(at_least_f32(x), red, feat, eps, center, stats)
    return affine(xhat, scale, offset, feat).astype(x.dtype), (xhat, inv)


def normalize_bwd(res, scale, dy, red, feat, center=True, fixed=False):
    """VJP of :func:`normalize_fwd` from its residuals ``(x̂, 1/σ)``; with fixed statistics
    the map is affine: ``dx = dx̂ / σ``."""
    xhat, inv = res
    dscale, doffset, dxhat = affine_backward(xhat, scale, at_least_f32(dy), feat)
    dx = dxhat * inv if fixed else standardize_backward(xhat, inv, dxhat, red, center)
    return cast_grads((dscale, doffset, dx), scale, dy)


def normalize(x, scale, offset, red, feat, eps, center=True, stats=None):
    """The output of :func:`normalize_fwd`."""
    return normalize_fwd(x, scale, offset, red, feat, eps, center, stats)[0]


def normalize_backward(x, scale, dy, red, feat, eps, center=True, stats=None):
    """VJP of :func:`normalize` from its input: ``(dscale or None, doffset, dx)``."""
    res = standardized(x, red, feat, eps, center, stats)
    return normalize_bwd(res, scale, dy, red, feat, center, stats is not None)


# --------------------------------------------------------------------------- layer helpers

def check_array(name, x):
    """``TypeError`` naming the layer unless ``x`` is an array."""
    if not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected an array input, got {type(x).__name__}")


def new_params(feature_shape, use_scale, use_offset):
    """``{"scale": ones, "offset": zeros}`` of ``feature_shape`` (each only if used)."""
    params = {}
    if use_scale:
        params["scale"] = jnp.ones(feature_shape, default_dtype())
    if use_offset:
        params["offset"] = jnp.zeros(feature_shape, default_dtype())
    return params


def check_params(name, params, x_shape, feature_shape):
    """``ValueError`` naming the layer unless every entry of ``params`` has ``feature_shape``."""
    for k, p in params.items():
        if tuple(p.shape) != tuple(feature_shape):
            raise ValueError(f"{name}: input of shape {tuple(x_shape)} has feature shape "
                             f"{tuple(feature_shape)}, but {k!r} has shape {tuple(p.shape)}")


def param_grads(dscale, doffset, params):
    """The gradients of the params the layer has: ``{"scale", "offset"}`` or a part of it."""
    return {k: g for k, g in (("scale", dscale), ("offset", doffset)) if k in params}
