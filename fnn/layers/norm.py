"""Normalization: ``BatchNorm``, ``LayerNorm``, ``InstanceNorm``, ``GroupNorm``, ``RMSNorm`` —
plain ops, hand-derived backward, layers (weight normalization is in ``weight_norm.py``).

Every normalizer standardizes over some *reduction* axes, then applies a learned affine map on
the *feature* axes::

    x̂ = (x − μ) / σ,   σ = √(var + eps)          (RMSNorm: x̂ = x / √(mean(x²) + eps))
    y = scale · x̂ + offset

``var`` is the biased variance (divide by ``N``). The backward of the standardization is one
compact formula, means taken over the reduction axes::

    dx = (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)) / σ      (RMSNorm: without the mean(dx̂) term)

with ``dx̂ = scale · dy``, ``dscale = Σ dy · x̂`` and ``doffset = Σ dy`` over the non-feature axes.
For batch norm this is the closed form ``dx = (scale/σ)/N · (N·dy − Σdy − x̂·Σ(dy·x̂))``.

Statistics are taken in at least float32 (a bfloat16 input is standardized in float32 and the
output cast back), so the normalizers keep their precision under ``fnn.precision`` policies.
Inputs are channels-last (``(batch, ..., features)``, Flax's layout). Each plain op takes
``scale``/``offset`` as arrays or ``None`` (no scale / no offset); each ``*_backward`` returns
``(dscale or None, doffset, dx)``, where ``doffset = Σ dy`` is returned even without an offset.

The layers keep ``(x̂, 1/σ)`` as their residuals: the backward above starts from them, so the
hand path computes the statistics once.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fnn.core import Example, Layer, constructor, default_dtype, examples, is_shape

__all__ = [
    "batch_norm", "batch_norm_backward", "layer_norm", "layer_norm_backward",
    "instance_norm", "instance_norm_backward", "group_norm", "group_norm_backward",
    "rms_norm", "rms_norm_backward",
    "BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "RMSNorm",
]


# --------------------------------------------------------------------------- shared pieces

def _axes(name, ndim, axis) -> tuple:
    """``axis`` (int or tuple) as sorted non-negative ints, checked against ``ndim``."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or any(not isinstance(a, int) or not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{name}: axis {axis!r} is out of range for an input of rank {ndim}")
    axes = tuple(sorted(a % ndim for a in axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}: axis {axis!r} repeats an axis")
    return axes


def _others(ndim, axes) -> tuple:
    return tuple(i for i in range(ndim) if i not in axes)


def _bshape(x_shape, axes) -> tuple:
    """Shape that broadcasts a ``[x_shape[a] for a in axes]`` array against ``x``."""
    return tuple(d if i in axes else 1 for i, d in enumerate(x_shape))


def _standardize(x, axes, eps, center=True):
    """``(x̂, 1/σ)`` over ``axes`` (``1/σ`` keeps dims); ``center=False`` is RMS scaling."""
    if center:
        x = x - jnp.mean(x, axes, keepdims=True)
    inv = lax.rsqrt(jnp.mean(x * x, axes, keepdims=True) + eps)
    return x * inv, inv


def _standardize_backward(xhat, inv, dxhat, axes, center=True):
    """``dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / σ`` over ``axes``."""
    d = dxhat - xhat * jnp.mean(dxhat * xhat, axes, keepdims=True)
    if center:
        d = d - jnp.mean(dxhat, axes, keepdims=True)
    return d * inv


def _affine(xhat, scale, offset, feat):
    bs = _bshape(xhat.shape, feat)
    y = xhat if scale is None else xhat * scale.reshape(bs)
    return y if offset is None else y + offset.reshape(bs)


def _affine_backward(xhat, scale, dy, feat):
    """``(dscale or None, doffset, dx̂)`` of ``y = scale·x̂ + offset``."""
    rest = _others(dy.ndim, feat)
    dscale = None if scale is None else jnp.sum(dy * xhat, rest)
    dxhat = dy if scale is None else dy * scale.reshape(_bshape(dy.shape, feat))
    return dscale, jnp.sum(dy, rest), dxhat


def _xhat(x, red, feat, eps, center, stats):
    """``(x̂, 1/σ)``: from the statistics over ``red``, or from given ``stats = (mean, var)``."""
    if stats is None:
        return _standardize(x, red, eps, center)
    bs = _bshape(x.shape, feat)
    inv = lax.rsqrt(stats[1].reshape(bs) + eps)
    return (x - stats[0].reshape(bs)) * inv, inv


def _up(x):
    """``x`` in at least float32: statistics of bfloat16/float16 inputs are taken in float32."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _down(grads, scale, dy):
    """``(dscale, doffset, dx)`` back to the dtypes of ``scale`` and ``dy``."""
    dscale, doffset, dx = grads
    return (None if dscale is None else dscale.astype(scale.dtype), doffset.astype(dy.dtype),
            dx.astype(dy.dtype))


def _normalize_fwd(x, scale, offset, red, feat, eps, center=True, stats=None):
    """Standardize over ``red`` (or with fixed ``stats``), then the affine map on ``feat``.
    Returns ``(y, (x̂, 1/σ))``; ``x̂`` and ``1/σ`` in at least float32, ``y`` in ``x``'s dtype."""
    xhat, inv = _xhat(_up(x), red, feat, eps, center, stats)
    return _affine(xhat, scale, offset, feat).astype(x.dtype), (xhat, inv)


def _normalize_bwd(res, scale, dy, red, feat, center=True, fixed=False):
    """VJP of :func:`_normalize_fwd` from its residuals ``(x̂, 1/σ)``; with fixed statistics
    the map is affine: ``dx = dx̂ / σ``."""
    xhat, inv = res
    dscale, doffset, dxhat = _affine_backward(xhat, scale, _up(dy), feat)
    dx = dxhat * inv if fixed else _standardize_backward(xhat, inv, dxhat, red, center)
    return _down((dscale, doffset, dx), scale, dy)


def _normalize(x, scale, offset, red, feat, eps, center=True, stats=None):
    return _normalize_fwd(x, scale, offset, red, feat, eps, center, stats)[0]


def _normalize_backward(x, scale, dy, red, feat, eps, center=True, stats=None):
    res = _xhat(x, red, feat, eps, center, stats)
    return _normalize_bwd(res, scale, dy, red, feat, center, stats is not None)


# --------------------------------------------------------------------------- plain ops

def layer_norm(x, scale=None, offset=None, eps=1e-5, axis=-1):
    """Layer norm over ``axis`` (default the last, as PyTorch ``nn.LayerNorm`` and Flax);
    ``scale``/``offset`` have the shape of the normalized axes (PyTorch's ``normalized_shape``)."""
    axes = _axes("layer_norm", x.ndim, axis)
    return _normalize(x, scale, offset, axes, axes, eps)


def layer_norm_backward(x, scale, dy, eps=1e-5, axis=-1):
    """VJP of :func:`layer_norm`: ``(dscale, doffset, dx)``."""
    axes = _axes("layer_norm", x.ndim, axis)
    return _normalize_backward(x, scale, dy, axes, axes, eps)


def rms_norm(x, scale=None, offset=None, eps=1e-6, axis=-1):
    """RMS norm (Zhang & Sennrich 2019): ``y = scale · x / √(mean(x²) + eps) + offset``."""
    axes = _axes("rms_norm", x.ndim, axis)
    return _normalize(x, scale, offset, axes, axes, eps, center=False)


def rms_norm_backward(x, scale, dy, eps=1e-6, axis=-1):
    """VJP of :func:`rms_norm`: ``dx = (dx̂ − x̂·mean(dx̂·x̂)) / rms``."""
    axes = _axes("rms_norm", x.ndim, axis)
    return _normalize_backward(x, scale, dy, axes, axes, eps, center=False)


def instance_norm(x, scale=None, offset=None, eps=1e-5):
    """Instance norm: per example and channel over the spatial axes of ``x: [b, *spatial, c]``."""
    return _normalize(x, scale, offset, tuple(range(1, x.ndim - 1)), (x.ndim - 1,), eps)


def instance_norm_backward(x, scale, dy, eps=1e-5):
    """VJP of :func:`instance_norm`: ``(dscale, doffset, dx)``."""
    return _normalize_backward(x, scale, dy, tuple(range(1, x.ndim - 1)), (x.ndim - 1,), eps)


def _grouped(x, groups):
    """``[b, *spatial, c] → [b, *spatial, groups, c/groups]`` and the axes to reduce over."""
    if x.shape[-1] % groups:
        raise ValueError(f"group_norm: {x.shape[-1]} channels do not split into {groups} groups; "
                         f"x shape {tuple(x.shape)}")
    xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    return xg, tuple(range(1, x.ndim - 1)) + (x.ndim,)


def _group_norm_fwd(x, scale, offset, groups, eps):
    """``(y, (x̂ [b, *spatial, groups, c/groups], 1/σ))``."""
    xg, red = _grouped(_up(x), groups)
    xhat_g, inv = _standardize(xg, red, eps)
    y = _affine(xhat_g.reshape(x.shape), scale, offset, (x.ndim - 1,))
    return y.astype(x.dtype), (xhat_g, inv)


def _group_norm_bwd(res, scale, dy):
    xhat_g, inv = res
    red = tuple(range(1, dy.ndim - 1)) + (dy.ndim,)
    dscale, doffset, dxhat = _affine_backward(xhat_g.reshape(dy.shape), scale, _up(dy),
                                              (dy.ndim - 1,))
    dx = _standardize_backward(xhat_g, inv, dxhat.reshape(xhat_g.shape), red)
    return _down((dscale, doffset, dx.reshape(dy.shape)), scale, dy)


def group_norm(x, scale=None, offset=None, groups=1, eps=1e-5):
    """Group norm (Wu & He 2018): channels split into ``groups``, each standardized per example
    over its channels and the spatial axes; ``scale``/``offset`` per channel ``[c]``."""
    return _group_norm_fwd(x, scale, offset, groups, eps)[0]


def group_norm_backward(x, scale, dy, groups=1, eps=1e-5):
    """VJP of :func:`group_norm`: ``(dscale, doffset, dx)``."""
    return _group_norm_bwd(_group_norm_fwd(x, scale, None, groups, eps)[1], scale, dy)


# --------------------------------------------------------------------------- layers

def _check_array(name, x):
    if not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected an array input, got {type(x).__name__}")


def _new_params(feature_shape, use_scale, use_offset):
    params = {}
    if use_scale:
        params["scale"] = jnp.ones(feature_shape, default_dtype())
    if use_offset:
        params["offset"] = jnp.zeros(feature_shape, default_dtype())
    return params


def _check_params(name, params, x_shape, feature_shape):
    for k, p in params.items():
        if tuple(p.shape) != tuple(feature_shape):
            raise ValueError(f"{name}: input of shape {tuple(x_shape)} has feature shape "
                             f"{tuple(feature_shape)}, but {k!r} has shape {tuple(p.shape)}")


def _grads(dscale, doffset, params):
    return {k: g for k, g in (("scale", dscale), ("offset", doffset)) if k in params}


def _affine_layer(name, features, op_fwd, op_bwd, use_scale, use_offset) -> Layer:
    """A stateless normalizer: ``features(shape)`` validates an input shape and returns the
    params' shape; ``op_fwd(x, scale, offset) -> (y, res)``; ``op_bwd(res, scale, dy)``."""

    def init(key, input_shape):
        if not is_shape(input_shape):
            raise ValueError(f"{name}: expected an input shape (batch, ...), got {input_shape}")
        return _new_params(features(tuple(input_shape)), use_scale, use_offset), {}, \
            tuple(input_shape)

    def check(params, x):
        _check_array(name, x)
        _check_params(name, params, x.shape, features(tuple(x.shape)))

    def apply(params, state, x, *, key=None, train=False):
        return fwd(params, state, x)[:2]

    def fwd(params, state, x, *, key=None, train=False):
        check(params, x)
        y, res = op_fwd(x, params.get("scale"), params.get("offset"))
        return y, state, res

    def bwd(params, state, res, dy, *, key=None, train=False):
        check(params, dy)
        dscale, doffset, dx = op_bwd(res, params.get("scale"), dy)
        return _grads(dscale, doffset, params), dx

    return Layer(init, apply, fwd, bwd, name)


def _axis_layer(name, axis, eps, center, use_scale, use_offset) -> Layer:
    """Layer norm (``center``) or RMS norm over ``axis``, affine on the same axes."""
    def features(shape):
        axes = _axes(name, len(shape), axis)          # negative axes: any leading axes work
        given = (axis,) if isinstance(axis, int) else tuple(axis)
        if any(a >= 0 for a in given) and (len(shape) < 2 or 0 in axes):
            raise ValueError(f"{name}: expected input (batch, ...) with axis {axis!r} not the "
                             f"batch axis, got shape {shape}")
        return tuple(shape[a] for a in axes)

    def op_fwd(x, s, o):
        axes = _axes(name, x.ndim, axis)
        return _normalize_fwd(x, s, o, axes, axes, eps, center)

    def op_bwd(res, s, dy):
        axes = _axes(name, dy.ndim, axis)
        return _normalize_bwd(res, s, dy, axes, axes, center)
    return _affine_layer(name, features, op_fwd, op_bwd, use_scale, use_offset)


@examples(Example((3, 5)), Example((2, 3, 4), kwargs={"axis": (-2, -1)}),
          Example((2, 3, 4), kwargs={"use_scale": False}))
@constructor
def LayerNorm(eps: float = 1e-5, axis=-1, use_scale: bool = True,
              use_offset: bool = True) -> Layer:
    """Layer norm: each example standardized over ``axis`` (default the last), then
    ``scale·x̂ + offset``; PyTorch ``nn.LayerNorm`` / Flax ``LayerNorm`` (eps ``1e-5`` as PyTorch).

    **Params:** ``{"scale", "offset"}`` of the normalized axes' shape. ``[..., features]`` →
    same, with any leading axes (none included) when ``axis`` counts from the end (negative);
    a non-negative ``axis`` counts the batch axis as 0 and may not name it.
    """
    name = f"LayerNorm(axis={axis})"
    return _axis_layer(name, axis, eps, True, use_scale, use_offset)


@examples(Example((3, 5)), Example((2, 3, 4), kwargs={"use_offset": True}))
@constructor
def RMSNorm(eps: float = 1e-6, axis=-1, use_scale: bool = True,
            use_offset: bool = False) -> Layer:
    """RMS norm (Zhang & Sennrich 2019): ``y = scale · x / √(mean(x²) + eps)`` over ``axis``; no
    centering, no offset by default (as Flax ``RMSNorm``, eps ``1e-6``).

    **Params:** ``{"scale"}`` (and ``"offset"`` if ``use_offset``). ``[..., features]`` → same,
    any leading axes (none included) for a negative ``axis``, as :func:`LayerNorm`.
    """
    name = f"RMSNorm(axis={axis})"
    return _axis_layer(name, axis, eps, False, use_scale, use_offset)


@examples(Example((2, 3, 4, 3)), Example((2, 5, 3), kwargs={"use_offset": False}))
@constructor
def InstanceNorm(eps: float = 1e-5, use_scale: bool = True, use_offset: bool = True) -> Layer:
    """Instance norm: each example and channel standardized over the spatial axes.

    Channels-last ``[batch, *spatial, c]``; affine on by default (Flax ``InstanceNorm``; PyTorch's
    ``InstanceNorm2d`` defaults to ``affine=False``); no running statistics.
    **Params:** ``{"scale": (c,), "offset": (c,)}``.
    """
    def features(shape):
        if len(shape) < 3:
            raise ValueError(f"InstanceNorm: expected input of rank >= 3 (batch, *spatial, "
                             f"channels), got shape {shape}")
        return shape[-1:]

    def spatial(ndim):
        return tuple(range(1, ndim - 1)), (ndim - 1,)

    return _affine_layer("InstanceNorm", features,
                         lambda x, s, o: _normalize_fwd(x, s, o, *spatial(x.ndim), eps),
                         lambda res, s, dy: _normalize_bwd(res, s, dy, *spatial(dy.ndim)),
                         use_scale, use_offset)


@examples(Example((2, 3, 3, 4), (2,)), Example((3, 6), (3,)))
@constructor
def GroupNorm(groups: int, eps: float = 1e-5, use_scale: bool = True,
              use_offset: bool = True) -> Layer:
    """Group norm (Wu & He 2018): the ``c`` channels split into ``groups`` groups, each standardized
    per example over its channels and the spatial axes. ``groups=1`` is layer norm over all
    non-batch axes, ``groups=c`` instance norm. Channels-last (Flax); PyTorch ``nn.GroupNorm``
    is channels-first.

    **Params:** ``{"scale": (c,), "offset": (c,)}``. ``[batch, *spatial, c]`` → same.
    """
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"GroupNorm: groups must be a positive int, got {groups!r}")

    def features(shape):
        if len(shape) < 2 or shape[-1] % groups:
            raise ValueError(f"GroupNorm({groups}): expected input (batch, ..., channels) with "
                             f"channels divisible by {groups}, got shape {shape}")
        return shape[-1:]

    return _affine_layer(f"GroupNorm({groups})", features,
                         lambda x, s, o: _group_norm_fwd(x, s, o, groups, eps),
                         lambda res, s, dy: _group_norm_bwd(res, s, dy), use_scale, use_offset)


from fnn.layers.batch_norm import BatchNorm, batch_norm, batch_norm_backward  # noqa: E402,F401
