"""Batch norm (Ioffe & Szegedy 2015): the plain op, its hand-derived backward and the layer.

The shared normalization machinery — standardize, the affine map and their backward, statistics
in at least float32 — lives in ``fnn.layers.norm``; batch norm adds running statistics (state)
and the evaluation mode that uses them.
"""
from __future__ import annotations

import jax.numpy as jnp

from fnn.core import Example, Layer, constructor, default_dtype, examples, is_shape
from fnn.layers.norm import (_axes, _check_array, _check_params, _grads, _new_params,
                             _normalize, _normalize_backward, _normalize_bwd, _normalize_fwd,
                             _others, _up)

__all__ = ["batch_norm", "batch_norm_backward", "BatchNorm"]


def _bn_args(x, mean, var, axis):
    if (mean is None) != (var is None):
        raise ValueError("batch_norm: give both mean and var (evaluation) or neither (training)")
    feat = _axes("batch_norm", x.ndim, axis)
    return _others(x.ndim, feat), feat, None if mean is None else (mean, var)


def batch_norm(x, scale=None, offset=None, mean=None, var=None, *, eps=1e-5, axis=-1):
    """Batch norm over every axis but the feature ``axis``: ``scale·(x − μ)/√(σ² + eps) + offset``.

    ``mean``/``var`` ``None``: batch statistics (training; biased variance, as PyTorch and Flax);
    given (``[features]``): those running statistics (evaluation).
    **Arguments:** ``x: [batch, ..., features]``; ``scale``, ``offset``: ``[features]`` or ``None``.
    """
    red, feat, stats = _bn_args(x, mean, var, axis)
    return _normalize(x, scale, offset, red, feat, eps, stats=stats)


def batch_norm_backward(x, scale, dy, mean=None, var=None, *, eps=1e-5, axis=-1):
    """VJP of :func:`batch_norm`: ``(dscale, doffset, dx)``. Training (``mean is None``):
    ``dx = (scale/σ)/N · (N·dy − Σdy − x̂·Σ(dy·x̂))``; evaluation: ``dx = scale·dy/√(var+eps)``.
    """
    red, feat, stats = _bn_args(x, mean, var, axis)
    return _normalize_backward(x, scale, dy, red, feat, eps, stats=stats)



@examples(Example((6, 4)), Example((2, 3, 3, 4), kwargs={"use_offset": False}),
          Example((3, 4, 5), kwargs={"axis": 1, "momentum": 0.5}))
@constructor
def BatchNorm(momentum: float = 0.9, eps: float = 1e-5, axis: int = -1, use_scale: bool = True,
              use_offset: bool = True) -> Layer:
    """Batch norm (Ioffe & Szegedy 2015) over every axis but the feature ``axis``.

    ``train=True``: normalize with the batch mean and biased variance, and return the updated
    running statistics ``new = momentum·old + (1 − momentum)·batch`` (Flax/Keras momentum; PyTorch's
    ``momentum=0.1`` is ours ``0.9``), the running variance fed by the *unbiased* batch variance
    ``N/(N−1)·var`` (PyTorch's convention; Flax uses the biased one). ``train=False``: normalize
    with the running statistics; the state is returned unchanged.
    After ``Dense`` (``[batch, features]``) and ``Conv`` (``[batch, h, w, c]``) alike.
    **Params:** ``{"scale": (c,), "offset": (c,)}``. **State:** ``{"mean": (c,) zeros,
    "var": (c,) ones}``.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
    name = f"BatchNorm(axis={axis})"

    def features(shape):
        feat = _axes(name, len(shape), axis)
        if len(shape) < 2 or feat == (0,) or len(feat) != 1:
            raise ValueError(f"{name}: expected input (batch, ..., features) with one feature "
                             f"axis that is not the batch axis, got shape {shape}")
        return (shape[feat[0]],)

    def init(key, input_shape):
        if not is_shape(input_shape):
            raise ValueError(f"{name}: expected an input shape (batch, ...), got {input_shape}")
        c = features(tuple(input_shape))
        state = {"mean": jnp.zeros(c, default_dtype()), "var": jnp.ones(c, default_dtype())}
        return _new_params(c, use_scale, use_offset), state, tuple(input_shape)

    def check(params, state, x, train):
        _check_array(name, x)
        c = features(tuple(x.shape))
        _check_params(name, {**params, **state}, x.shape, c)
        n = x.size // c[0]
        if train and n < 2:
            raise ValueError(f"{name}: train=True needs more than one value per feature to "
                             f"estimate the variance, got input shape {tuple(x.shape)}")
        return n

    def apply(params, state, x, *, key=None, train=False):
        return fwd(params, state, x, train=train)[:2]

    def fwd(params, state, x, *, key=None, train=False):
        n = check(params, state, x, train)
        feat = _axes(name, x.ndim, axis)
        red = _others(x.ndim, feat)
        s, o = params.get("scale"), params.get("offset")
        if not train:
            y, res = _normalize_fwd(x, s, o, red, feat, eps, stats=(state["mean"], state["var"]))
            return y, state, res
        mean, var = jnp.mean(_up(x), red), jnp.var(_up(x), red)          # [c], biased
        new = {"mean": momentum * state["mean"] + (1 - momentum) * mean,
               "var": momentum * state["var"] + (1 - momentum) * var * (n / (n - 1))}
        new = {k: v.astype(state[k].dtype) for k, v in new.items()}
        y, res = _normalize_fwd(x, s, o, red, feat, eps)
        return y, new, res

    def bwd(params, state, res, dy, *, key=None, train=False):
        check(params, state, dy, train)
        feat = _axes(name, dy.ndim, axis)
        dscale, doffset, dx = _normalize_bwd(res, params.get("scale"), dy, _others(dy.ndim, feat),
                                             feat, fixed=not train)
        return _grads(dscale, doffset, params), dx

    return Layer(init, apply, fwd, bwd, name)
