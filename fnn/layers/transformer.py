"""Transformer blocks: the ``MLP`` sublayer and ``TransformerBlock`` (pre- or post-norm).

A block is two residual sublayers, built from fnn's combinators so their backward is the
children's backward rules run in reverse::

    pre-norm  (GPT-2):   h = x + Drop(Attn(Norm(x))),   y = h + Drop(MLP(Norm(h)))
    post-norm (Vaswani): h = Norm(x + Drop(Attn(x))),   y = Norm(h + Drop(MLP(h)))

with ``MLP(x) = act(x W₁ + b₁) W₂ + b₂`` (GELU by default), or the gated
``GatedMLP(x) = (act(x W_g) ⊙ x W_u) W_d`` (SwiGLU, as Llama) with ``mlp="gated"``. ``MLP.fwd`` keeps ``x`` and
``z = x W₁ + b₁`` as residuals; a block's ``fwd``/``bwd`` are its composition's,
carrying every child's residuals. Stack blocks with ``fnn.core.stack(TransformerBlock(...),
depth)`` for one ``lax.scan`` over the layers (its hand backward then runs each block's ``bwd``
from the residuals the forward scan stacked).
"""
from __future__ import annotations

import jax

from fnn import activations as acts
from fnn import initializers as inits
from fnn.combinators import residual, serial
from fnn.core import Example, Layer, constructor, default_dtype, examples, is_shape
from fnn.layers.multi_head_attention import MultiHeadAttention
from fnn.layers.dense import dense, dense_backward
from fnn.layers.dropout import Dropout
from fnn.layers.gated_mlp import GatedMLP
from fnn.layers.norm import LayerNorm, RMSNorm

__all__ = ["mlp", "mlp_backward", "MLP", "TransformerBlock"]


def mlp(x, w1, b1, w2, b2, activation=acts.gelu):
    """``y = act(x W₁ + b₁) W₂ + b₂``. ``x: [..., F]``, ``w1: [F, H]``, ``w2: [H, O]``; biases may
    be ``None``. **Returns:** ``[..., O]``."""
    return dense(activation(dense(x, w1, b1)), w2, b2)


def mlp_backward(x, w1, b1, w2, b2, dy, activation=acts.gelu):
    """VJP of :func:`mlp`: ``dW₂ = aᵀ dy``, ``dz = act'(z) ⊙ dy W₂ᵀ``, ``dW₁ = xᵀ dz``,
    ``dx = dz W₁ᵀ`` with ``z = x W₁ + b₁``, ``a = act(z)``.

    Returns ``(dw1, db1, dw2, db2, dx)`` (``db`` ``None`` where the bias is ``None``).
    """
    z = dense(x, w1, b1)
    dw2, db2, da = dense_backward(activation(z), w2, dy, b2 is not None)
    dz = activation.vjp(z, da)
    dw1, db1, dx = dense_backward(x, w1, dz, b1 is not None)
    return dw1, db1, dw2, db2, dx


@examples(Example((2, 3, 4), (8,)), Example((5, 3), (6, 2), {"activation": acts.relu,
                                                            "use_bias": False}))
@constructor
def MLP(hidden_features: int, out_features: int | None = None, *, activation=acts.gelu,
        use_bias: bool = True, w_init=None) -> Layer:
    """Two-layer perceptron ``y = act(x W₁ + b₁) W₂ + b₂`` over the last axis (the transformer's
    feed-forward sublayer; GELU exact by default, as PyTorch ``nn.GELU``). ``activation`` is any
    fnn activation — ``gelu_tanh`` (GPT-2's ``gelu_new``), ``quick_gelu``, ``swish``/``silu``,
    ``relu``, ... — or a function of yours carrying a hand-derived ``.vjp(z, dy)``; one without
    raises ``TypeError`` saying so.

    **Params:** ``{"fc1": {"w": (F, hidden), "b"}, "fc2": {"w": (hidden, out), "b"}}``, Glorot
    uniform kernels, zero biases. ``[batch, ..., F]`` → ``[batch, ..., out_features or F]``.
    """
    for what, n in (("hidden_features", hidden_features), ("out_features", out_features or 1)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"MLP: {what} must be a positive int, got {n!r}")
    acts.check_activation(activation, "MLP")
    name = f"MLP({hidden_features})"
    w_init = w_init or inits.glorot_uniform()

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) < 2:
            raise ValueError(f"{name}: expected input shape (batch, ..., features), "
                             f"got {input_shape}")
        f = input_shape[-1]
        sizes = {"fc1": (f, hidden_features), "fc2": (hidden_features, out_features or f)}
        params = {}
        for k, (n, s) in zip(jax.random.split(key), sizes.items()):
            params[n] = {"w": w_init(k, s, default_dtype())}
            if use_bias:
                params[n]["b"] = inits.zeros(None, (s[1],), default_dtype())
        return params, {}, tuple(input_shape[:-1]) + (sizes["fc2"][1],)

    def unpack(params, x):
        if not hasattr(x, "ndim") or x.ndim < 2 or x.shape[-1] != params["fc1"]["w"].shape[0]:
            raise ValueError(f"{name}: expected input of shape (batch, ..., "
                             f"{params['fc1']['w'].shape[0]}), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        p1, p2 = params["fc1"], params["fc2"]
        return p1["w"], p1.get("b"), p2["w"], p2.get("b")

    def apply(params, state, x, *, key=None, train=False):
        return mlp(x, *unpack(params, x), activation), state

    def fwd(params, state, x, *, key=None, train=False):
        w1, b1, w2, b2 = unpack(params, x)
        z = dense(x, w1, b1)
        # act(z) is recomputed in bwd: cheaper here than keeping it (benchmarks/RESULTS.md)
        return dense(activation(z), w2, b2), state, {"x": x, "z": z}

    def bwd(params, state, res, dy, *, key=None, train=False):
        w1, b1, w2, b2 = unpack(params, res["x"])
        z = res["z"]
        dw2, db2, da = dense_backward(activation(z), w2, dy, b2 is not None)  # dW₂ = act(z)ᵀ dy
        dz = activation.vjp(z, da)                                            # act'(z) ⊙ da
        dw1, db1, dx = dense_backward(res["x"], w1, dz, b1 is not None)
        pack = lambda w, b: {"w": w} if b is None else {"w": w, "b": b}
        return {"fc1": pack(dw1, db1), "fc2": pack(dw2, db2)}, dx

    return Layer(init, apply, fwd, bwd, name)


def _norm(norm_type, eps):
    if norm_type == "layer":
        return LayerNorm() if eps is None else LayerNorm(eps)
    if norm_type == "rms":
        return RMSNorm() if eps is None else RMSNorm(eps)
    raise ValueError(f"TransformerBlock: norm_type must be 'layer' or 'rms', got {norm_type!r}")


@examples(Example((2, 5, 8), (2, 16), {"use_bias": False}),           # see MultiHeadAttention
          Example((2, 4, 8), (2, 12), {"norm": "post", "norm_type": "rms", "causal": True,
                                       "dropout": 0.2, "use_bias": False}),
          Example((2, 4, 8), (4, 12), {"norm_type": "rms", "causal": True, "num_kv_heads": 2,
                                       "rope": True, "rope_base": 500.0, "mlp": "gated",
                                       "activation": acts.swish, "use_bias": False,
                                       "eps": 1e-5}))
@constructor
def TransformerBlock(num_heads: int, mlp_features: int, dropout: float = 0.0,
                     norm: str = "pre", causal: bool = False, *, norm_type: str = "layer",
                     eps: float | None = None, head_dim: int | None = None,
                     num_kv_heads: int | None = None, rope: bool = False,
                     rope_base: float = 10000.0, chunk_size: int | str | None = None,
                     activation=acts.gelu, use_bias: bool = True, mlp="dense") -> Layer:
    """Transformer block: self-attention and MLP sublayers with residuals and normalization.

    ``norm="pre"`` (GPT-2, default): ``h = x + Attn(Norm(x))``, ``y = h + MLP(Norm(h))``;
    ``norm="post"`` (Vaswani et al.; PyTorch ``TransformerEncoderLayer`` default):
    ``h = Norm(x + Attn(x))``, ``y = Norm(h + MLP(h))``. ``norm_type``: ``"layer"`` (LayerNorm)
    or ``"rms"`` (RMSNorm). ``dropout`` applies to the attention probabilities and to each
    sublayer's output before the residual sum (``train=True`` then needs a ``key``).
    Attention options (``causal``, ``head_dim``, ``num_kv_heads``, ``rope``, ``rope_base``,
    ``chunk_size``) go to :func:`MultiHeadAttention`; keywords ``mask``, ``cache_len`` reach it.
    ``eps``: the norms' epsilon (default LayerNorm's 1e-5, RMSNorm's 1e-6). ``use_bias=False``
    drops every dense bias (as LLaMA). ``mlp``: ``"dense"`` (:func:`MLP`, ``fc1``/``fc2``),
    ``"gated"`` (:func:`GatedMLP`, ``gate``/``up``/``down``: SwiGLU with ``activation=swish``),
    or any layer mapping ``[batch, time, F]`` to itself; ``activation`` (any fnn activation
    carrying ``.vjp``) goes to the first two.
    **Params:** pre ``{"attn": {"norm", "mha"}, "mlp": {"norm", "mlp"}}``; post ``{"attn":
    {"mha"}, "norm1", "mlp": {"mlp"}, "norm2"}``. ``[batch, time, F]`` → same.
    """
    if norm not in ("pre", "post"):
        raise ValueError(f"TransformerBlock: norm must be 'pre' or 'post', got {norm!r}")
    acts.check_activation(activation, "TransformerBlock")
    mha = MultiHeadAttention(num_heads, head_dim, num_kv_heads, dropout=dropout,
                             use_bias=use_bias, causal=causal, rope=rope, rope_base=rope_base,
                             chunk_size=chunk_size)
    if isinstance(mlp, Layer):
        ff = mlp
    elif mlp in ("dense", "gated"):
        ff = (MLP if mlp == "dense" else GatedMLP)(mlp_features, activation=activation,
                                                   use_bias=use_bias)
    else:
        raise ValueError(f"TransformerBlock: mlp must be 'dense', 'gated' or a Layer, got {mlp!r}")
    drop = [("drop", Dropout(dropout))] if dropout else []
    if norm == "pre":
        block = serial(("attn", residual(serial(("norm", _norm(norm_type, eps)), ("mha", mha),
                                                *drop))),
                       ("mlp", residual(serial(("norm", _norm(norm_type, eps)), ("mlp", ff),
                                               *drop))))
    else:
        block = serial(("attn", residual(serial(("mha", mha), *drop))),
                       ("norm1", _norm(norm_type, eps)),
                       ("mlp", residual(serial(("mlp", ff), *drop))),
                       ("norm2", _norm(norm_type, eps)))
    name = f"TransformerBlock({num_heads}, {mlp_features}, {norm})"

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 3:
            raise ValueError(f"{name}: expected input shape (batch, time, features), "
                             f"got {input_shape}")
        return block.init(key, input_shape)

    return Layer(init, block.apply, block.fwd, block.bwd, name, keywords=block.keywords,
                 children=(("block", block),), stochastic=block.stochastic)
