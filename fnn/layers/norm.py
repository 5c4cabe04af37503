"""Normalization: ``LayerNorm``, ``InstanceNorm``, ``GroupNorm``, ``RMSNorm`` — plain ops,
hand-derived backward, layers (``BatchNorm`` is in ``batch_norm.py``, weight normalization in
``weight_norm.py``; the machinery they share, in ``_normalize.py``).

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

from fnn.core import Example, Layer, constructor, examples, is_shape
from fnn.layers._normalize import (affine, affine_backward, at_least_f32, axes_of, cast_grads,
                                   check_array, check_params, new_params, normalize,
                                   normalize_backward, normalize_bwd, normalize_fwd, param_grads,
                                   standardize, standardize_backward)

__all__ = [
    "layer_norm", "layer_norm_backward", "instance_norm", "instance_norm_backward",
    "group_norm", "group_norm_backward", "rms_norm", "rms_norm_backward",
    "LayerNorm", "InstanceNorm", "GroupNorm", "RMSNorm",
]


# --------------------------------------------------------------------------- plain ops

def layer_norm(x, scale=None, offset=None, eps=1e-5, axis=-1):
    """Layer norm over ``axis`` (default the last, as PyTorch ``nn.LayerNorm`` and Flax);
    ``scale``/``offset`` have the shape of the normalized axes (PyTorch's ``normalized_shape``)."""
    axes = axes_of("layer_norm", x.ndim, axis)
    return normalize(x, scale, offset, axes, axes, eps)


def layer_norm_backward(x, scale, dy, eps=1e-5, axis=-1):
    """VJP of :func:`layer_norm`: ``(dscale, doffset, dx)``."""
    axes = axes_of("layer_norm", x.ndim, axis)
    return normalize_backward(x, scale, dy, axes, axes, eps)


def rms_norm(x, scale=None, offset=None, eps=1e-6, axis=-1):
    """RMS norm (Zhang & Sennrich 2019): ``y = scale · x / √(mean(x²) + eps) + offset``."""
    axes = axes_of("rms_norm", x.ndim, axis)
    return normalize(x, scale, offset, axes, axes, eps, center=False)


def rms_norm_backward(x, scale, dy, eps=1e-6, axis=-1):
    """VJP of :func:`rms_norm`: ``dx = (dx̂ − x̂·mean(dx̂·x̂)) / rms``."""
    axes = axes_of("rms_norm", x.ndim, axis)
    return normalize_backward(x, scale, dy, axes, axes, eps, center=False)


def instance_norm(x, scale=None, offset=None, eps=1e-5):
    """Instance norm: per example and channel over the spatial axes of ``x: [b, *spatial, c]``."""
    return normalize(x, scale, offset, tuple(range(1, x.ndim - 1)), (x.ndim - 1,), eps)


def instance_norm_backward(x, scale, dy, eps=1e-5):
    """VJP of :func:`instance_norm`: ``(dscale, doffset, dx)``."""
    return normalize_backward(x, scale, dy, tuple(range(1, x.ndim - 1)), (x.ndim - 1,), eps)


def _grouped(x, groups):
    """``[b, *spatial, c] → [b, *spatial, groups, c/groups]`` and the axes to reduce over."""
    if x.shape[-1] % groups:
        raise ValueError(f"group_norm: {x.shape[-1]} channels do not split into {groups} groups; "
                         f"x shape {tuple(x.shape)}")
    xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    return xg, tuple(range(1, x.ndim - 1)) + (x.ndim,)


def _group_norm_fwd(x, scale, offset, groups, eps):
    """``(y, (x̂ [b, *spatial, groups, c/groups], 1/σ))``."""
    xg, red = _grouped(at_least_f32(x), groups)
    xhat_g, inv = standardize(xg, red, eps)
    y = affine(xhat_g.reshape(x.shape), scale, offset, (x.ndim - 1,))
    return y.astype(x.dtype), (xhat_g, inv)


def _group_norm_bwd(res, scale, dy):
    xhat_g, inv = res
    red = tuple(range(1, dy.ndim - 1)) + (dy.ndim,)
    dscale, doffset, dxhat = affine_backward(xhat_g.reshape(dy.shape), scale, at_least_f32(dy),
                                              (dy.ndim - 1,))
    dx = standardize_backward(xhat_g, inv, dxhat.reshape(xhat_g.shape), red)
    return cast_grads((dscale, doffset, dx.reshape(dy.shape)), scale, dy)


def group_norm(x, scale=None, offset=None, groups=1, eps=1e-5):
    """Group norm (Wu & He 2018): channels split into ``groups``, each standardized per example
    over its channels and the spatial axes; ``scale``/``offset`` per channel ``[c]``."""
    return _group_norm_fwd(x, scale, offset, groups, eps)[0]


def group_norm_backward(x, scale, dy, groups=1, eps=1e-5):
    """VJP of :func:`group_norm`: ``(dscale, doffset, dx)``."""
    return _group_norm_bwd(_group_norm_fwd(x, scale, None, groups, eps)[1], scale, dy)


# --------------------------------------------------------------------------- layers

def _affine_layer(name, features, op_fwd, op_bwd, use_scale, use_offset) -> Layer:
    """A stateless normalizer: ``features(shape)`` validates an input shape and returns the
    params' shape; ``op_fwd(x, scale, offset) -> (y, res)``; ``op_bwd(res, scale, dy)``."""

    def init(key, input_shape):
        if not is_shape(input_shape):
            raise ValueError(f"{name}: expected an input shape (batch, ...), got {input_shape}")
        return new_params(features(tuple(input_shape)), use_scale, use_offset), {}, \
            tuple(input_shape)

    def check(params, x):
        check_array(name, x)
        check_params(name, params, x.shape, features(tuple(x.shape)))

    def apply(params, state, x, *, key=None, train=False):
        return fwd(params, state, x)[:2]

    def fwd(params, state, x, *, key=None, train=False):
        check(params, x)
        y, res = op_fwd(x, params.get("scale"), params.get("offset"))
        return y, state, res

    def bwd(params, state, res, dy, *, key=None, train=False):
        check(params, dy)
        dscale, doffset, dx = op_bwd(res, params.get("scale"), dy)
        return param_grads(dscale, doffset, params), dx

    return Layer(init, apply, fwd, bwd, name)


def _axis_layer(name, axis, eps, center, use_scale, use_offset) -> Layer:
    """Layer norm (``center``) or RMS norm over ``axis``, affine on the same axes."""
    def features(shape):
        axes = axes_of(name, len(shape), axis)          # negative axes: any leading axes work
        given = (axis,) if isinstance(axis, int) else tuple(axis)
        if any(a >= 0 for a in given) and (len(shape) < 2 or 0 in axes):
            raise ValueError(f"{name}: expected input (batch, ...) with axis {axis!r} not the "
                             f"batch axis, got shape {shape}")
        return tuple(shape[a] for a in axes)

    def op_fwd(x, s, o):
        axes = axes_of(name, x.ndim, axis)
        return normalize_fwd(x, s, o, axes, axes, eps, center)

    def op_bwd(res, s, dy):
        axes = axes_of(name, dy.ndim, axis)
        return normalize_bwd(res, s, dy, axes, axes, center)
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
                         lambda x, s, o: normalize_fwd(x, s, o, *spatial(x.ndim), eps),
                         lambda res, s, dy: normalize_bwd(res, s, dy, *spatial(dy.ndim)),
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

