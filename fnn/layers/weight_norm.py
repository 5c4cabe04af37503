"""Weight normalization (Salimans & Kingma, 2016): a kernel reparameterized as
``w = g · v / ‖v‖`` — plain op, hand-derived backward, and the ``WeightNorm`` wrapper layer."""
from __future__ import annotations

import jax.numpy as jnp

from fnn.core import Example, Layer, constructor, examples, from_backward
from fnn.layers.dense import Dense

__all__ = ["weight_norm", "weight_norm_backward", "WeightNorm"]


def _vnorm(v):
    """``‖v‖`` over every axis but the last, kept as ``[1, ..., 1, out]``."""
    return jnp.sqrt(jnp.sum(v * v, tuple(range(v.ndim - 1)), keepdims=True))


def weight_norm(v, g):
    """Weight normalization (Salimans & Kingma 2016): ``w = g · v / ‖v‖``, the norm over every axis
    but the last (output features). ``v: [..., out]``, ``g: [out]`` → ``w`` shaped like ``v``."""
    if tuple(g.shape) != tuple(v.shape[-1:]):
        raise ValueError(f"weight_norm: g must have shape {tuple(v.shape[-1:])} (one per output "
                         f"feature of v {tuple(v.shape)}), got {tuple(g.shape)}")
    return v * (g.reshape((1,) * (v.ndim - 1) + (-1,)) / _vnorm(v))


def weight_norm_backward(v, g, dw):
    """VJP of :func:`weight_norm`: ``dg = Σ dw·v / ‖v‖``, ``dv = g/‖v‖ · (dw − (dg/‖v‖)·v)``.

    Returns ``(dv, dg)``.
    """
    n = _vnorm(v)                                              # [1, ..., 1, out]
    dg = jnp.sum(dw * v / n, tuple(range(v.ndim - 1)))         # [out]
    gb, dgb = (a.reshape(n.shape) for a in (g, dg))
    return gb / n * (dw - dgb / n * v), dg


@examples(Example((4, 5), (Dense(3),)), Example((2, 3, 4), (Dense(2, use_bias=False),)))
@constructor
def WeightNorm(layer: Layer) -> Layer:
    """Weight normalization (Salimans & Kingma 2016) of a layer with a kernel ``params["w"]``
    (last axis = output features, as ``Dense`` and ``Conv``): ``w = g · v / ‖v‖``, the norm over
    every axis but the last (PyTorch ``weight_norm`` with ``dim=0`` on its ``(out, in)`` layout).

    **Params:** ``{"v": w's shape, "g": (out,), **the layer's other params}``, initialised so that
    ``w`` equals the wrapped layer's initial kernel (``g = ‖v‖``, as PyTorch). Backward: the layer's
    backward gives ``dw``, then :func:`weight_norm_backward`. State, keys, keywords pass through.
    """
    name = f"WeightNorm({layer.name})"

    def init(key, input_shape):
        params, state, out = layer.init(key, input_shape)
        if "w" not in params or params["w"].ndim < 2:
            raise ValueError(f"{name}: the wrapped layer needs a kernel params['w'] of rank >= 2, "
                             f"got params {sorted(params)}")
        rest = {k: p for k, p in params.items() if k != "w"}
        return {**rest, "v": params["w"], "g": _vnorm(params["w"]).reshape(-1)}, state, out

    def inner(params):
        if "v" not in params or "g" not in params:
            raise ValueError(f"{name}: expected params with 'v' and 'g', got {sorted(params)}")
        rest = {k: p for k, p in params.items() if k not in ("v", "g")}
        return {**rest, "w": weight_norm(params["v"], params["g"])}

    def apply(params, state, x, *, key=None, train=False, **kw):
        return layer.apply(inner(params), state, x, key=key, train=train, **kw)

    def backward(params, state, x, dy, *, key=None, train=False, **kw):
        grads, dx = layer.backward(inner(params), state, x, dy, key=key, train=train, **kw)
        grads = dict(grads)
        dv, dg = weight_norm_backward(params["v"], params["g"], grads.pop("w"))
        return {**grads, "v": dv, "g": dg}, dx

    return from_backward(init, apply, backward, name=name, keywords=layer.keywords,
                         children=(("layer", layer),), stochastic=layer.stochastic)
