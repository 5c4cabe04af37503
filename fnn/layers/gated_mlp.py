"""The gated MLP (Shazeer 2020, "GLU Variants Improve Transformer"): SwiGLU, GeGLU.

::

    g = x W_g,   u = x W_u,   y = (act(g) ⊙ u) W_d          (+ biases with use_bias=True)

Llama's feed-forward (``gate_proj``, ``up_proj``, ``down_proj``, SiLU, no biases) is
``GatedMLP(hidden)``; GeGLU is ``GatedMLP(hidden, activation=gelu)``. The same block from
public layers is ``serial(parallel(serial(Dense(h), Swish()), Dense(h)), Multiply(), Dense(d))``;
this one fuses it and keeps ``x``, ``g`` and ``u`` as residuals.
"""
from __future__ import annotations

import jax

from fnn import activations as acts
from fnn import initializers as inits
from fnn.core import Example, Layer, constructor, default_dtype, examples, is_shape
from fnn.layers.dense import dense, dense_backward

__all__ = ["gated_mlp", "gated_mlp_backward", "GatedMLP"]


def gated_mlp(x, w_g, w_u, w_d, b_g=None, b_u=None, b_d=None, activation=acts.swish):
    """``y = (act(x W_g + b_g) ⊙ (x W_u + b_u)) W_d + b_d``. ``x: [..., F]``, ``w_g, w_u: [F, H]``,
    ``w_d: [H, O]``; biases may be ``None``. **Returns:** ``[..., O]``."""
    return dense(activation(dense(x, w_g, b_g)) * dense(x, w_u, b_u), w_d, b_d)


def gated_mlp_backward(x, g, u, w_g, w_u, w_d, dy, use_bias=False, activation=acts.swish):
    """VJP of :func:`gated_mlp` from ``x`` and the two projections ``g``, ``u``: with ``a =
    act(g)``, ``h = a ⊙ u``: ``dW_d = hᵀ dy``, ``dh = dy W_dᵀ``, ``du = dh ⊙ a``, ``dg =
    act'(g) ⊙ dh ⊙ u``, ``dW_u = xᵀ du``, ``dW_g = xᵀ dg``, ``dx = dg W_gᵀ + du W_uᵀ``.

    Returns ``({"gate", "up", "down"}: {"w"[, "b"]}, dx)``.
    """
    a = activation(g)
    dw_d, db_d, dh = dense_backward(a * u, w_d, dy, use_bias)
    dg = activation.vjp(g, dh * u)
    dw_g, db_g, dx_g = dense_backward(x, w_g, dg, use_bias)
    dw_u, db_u, dx_u = dense_backward(x, w_u, dh * a, use_bias)
    pack = lambda w, b: {"w": w, "b": b} if use_bias else {"w": w}
    return {"gate": pack(dw_g, db_g), "up": pack(dw_u, db_u), "down": pack(dw_d, db_d)}, dx_g + dx_u


@examples(Example((2, 3, 4), (6,)),
          Example((5, 4), (3, 2), {"activation": acts.gelu_tanh, "use_bias": True}))
@constructor
def GatedMLP(hidden_features: int, out_features: int | None = None, *, activation=acts.swish,
             use_bias: bool = False, w_init=None) -> Layer:
    """Gated feed-forward ``y = (act(x W_g) ⊙ (x W_u)) W_d`` over the last axis: SwiGLU with the
    default SiLU (Llama, Mistral), GeGLU with ``activation=gelu``/``gelu_tanh`` (Gemma).
    ``activation`` is any fnn activation (it must carry ``.vjp``); ``use_bias=True`` adds
    ``b_g``, ``b_u``, ``b_d``.

    **Params:** ``{"gate": {"w": (F, hidden)}, "up": {"w": (F, hidden)}, "down": {"w": (hidden,
    out)}}`` (``"b"`` in each with ``use_bias``), Glorot-uniform kernels, zero biases. From
    Hugging Face Llama's ``mlp``: ``gate.w = gate_proj.weight.T``, ``up.w = up_proj.weight.T``,
    ``down.w = down_proj.weight.T``. ``[batch, ..., F]`` → ``[batch, ..., out_features or F]``.
    Backward: :func:`gated_mlp_backward` from the residuals ``x``, ``g = x W_g``, ``u = x W_u``.

    >>> from fnn.core import output_shape
    >>> output_shape(GatedMLP(32), (2, 5, 8))
    (2, 5, 8)
    """
    for what, n in (("hidden_features", hidden_features), ("out_features", out_features or 1)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"GatedMLP: {what} must be a positive int, got {n!r}")
    activation = acts.check_activation(activation, "GatedMLP")
    name = f"GatedMLP({hidden_features})"
    w_init = w_init or inits.glorot_uniform()

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) < 1:
            raise ValueError(f"{name}: expected input shape (..., features), got {input_shape}")
        f = input_shape[-1]
        sizes = {"gate": (f, hidden_features), "up": (f, hidden_features),
                 "down": (hidden_features, out_features or f)}
        params = {}
        for k, (n, s) in zip(jax.random.split(key, 3), sizes.items()):
            params[n] = {"w": w_init(k, s, default_dtype())}
            if use_bias:
                params[n]["b"] = inits.zeros(None, (s[1],), default_dtype())
        return params, {}, tuple(input_shape[:-1]) + (sizes["down"][1],)

    def unpack(params, x):
        want = params["gate"]["w"].shape[0]
        if not hasattr(x, "ndim") or x.ndim < 1 or x.shape[-1] != want:
            raise ValueError(f"{name}: expected input of shape (..., {want}), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if ("b" in params["gate"]) != use_bias:
            raise ValueError(f"{name}: params {'lack' if use_bias else 'have'} biases but "
                             f"use_bias={use_bias}")
        return [params[n][k] if k in params[n] else None
                for k in ("w", "b") for n in ("gate", "up", "down")]

    def apply(params, state, x, *, key=None, train=False):
        w_g, w_u, w_d, b_g, b_u, b_d = unpack(params, x)
        return gated_mlp(x, w_g, w_u, w_d, b_g, b_u, b_d, activation), state

    def fwd(params, state, x, *, key=None, train=False):
        w_g, w_u, w_d, b_g, b_u, b_d = unpack(params, x)
        g, u = dense(x, w_g, b_g), dense(x, w_u, b_u)
        return dense(activation(g) * u, w_d, b_d), state, {"x": x, "g": g, "u": u}

    def bwd(params, state, res, dy, *, key=None, train=False):
        w_g, w_u, w_d = unpack(params, res["x"])[:3]
        return gated_mlp_backward(res["x"], res["g"], res["u"], w_g, w_u, w_d, dy, use_bias,
                                  activation)

    return Layer(init, apply, fwd, bwd, name)
