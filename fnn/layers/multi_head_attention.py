"""``MultiHeadAttention``: projections, rotary positions and the attention op of
``fnn/layers/attention.py``, as a layer with residuals; and the KV cache for decoding.

Forward (self-attention, ``x: [b, T, F]``; cross-attention takes ``(x, context)``)::

    q, k, v = rope(x W_q + b_q), rope(c W_k + b_k), c W_v + b_v       (split into heads)
    A = attention(q, k, v),   y = A W_o + b_o

``fwd`` keeps ``x`` (and ``context``) and the attention op's residuals (``q, k, v``, ``A`` and
each row's log-sum-exp) so ``bwd`` runs::

    dW_o = Aᵀ dy,   dA = dy W_oᵀ,   (dq, dk, dv) = attention_bwd(dA),
    dq, dk = ropeᵀ(dq), ropeᵀ(dk),   dW_q = xᵀ dq, ...,   dx = dq W_qᵀ + (dk W_kᵀ + dv W_vᵀ)

**Decoding.** Layers with positions take the keyword ``cache_len=L``: ``state`` is then the
explicit cache (``{}`` starts an empty one of capacity ``L``), the input holds the next positions,
and ``apply`` returns ``(y, new_cache)``. Composed with ``serial``/``residual``/``stack`` the whole
model's cache is its state pytree. :func:`init_cache` and :func:`decode_step` wrap this for any
such model, the GPT included, with one signature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fnn import initializers as inits
from fnn.core import Example, Layer, constructor, default_dtype, examples, is_shape
from fnn.layers.attention import (dot_product_attention, dot_product_attention_bwd,
                                  dot_product_attention_fwd)
from fnn.layers.dense import dense, dense_backward
from fnn.layers.positional import check_room, rope as rope_op, rope_backward

__all__ = ["MultiHeadAttention", "init_cache", "decode_step"]


def _mask_example(key, input_shape):
    b, t = input_shape[:2]
    mask = jax.random.bernoulli(key, 0.7, (b, 1, t, t))
    return {"mask": mask.at[0, 0, 1, :].set(False)}                         # one empty row


# use_bias=False in the sweep: the key bias's gradient is exactly zero in exact arithmetic
# (softmax ignores a constant added to a row), so vjp and backward agree only to roundoff, which
# the sweep's relative test cannot tell from an error; tests/test_multi_head_attention.py checks
# use_bias=True and the chunked form (slow to run eagerly here).
@examples(Example((2, 5, 8), (2,), {"use_bias": False}),
          Example((2, 6, 8), (4,), {"num_kv_heads": 2, "causal": True, "rope": True,
                                    "dropout": 0.25, "use_bias": False},
                  call_kwargs=_mask_example),
          Example(((2, 4, 6), (2, 5, 3)), (2,), {"head_dim": 3, "out_features": 5,
                                                 "use_bias": False}))
@constructor
def MultiHeadAttention(num_heads: int, head_dim: int | None = None,
                       num_kv_heads: int | None = None, out_features: int | None = None,
                       dropout: float = 0.0, use_bias: bool = True, *, causal: bool = False,
                       rope: bool = False, rope_base: float = 10000.0,
                       chunk_size: int | None = None, w_init=None) -> Layer:
    """Multi-head attention ``y = concat_h(softmax(q_h k_hᵀ/√d) v_h) W_o + b_o`` (Vaswani et al.).

    **Input:** ``x: [batch, T, F]`` (self-attention) or a pair ``(x, context: [batch, S, Fc])``
    (cross-attention; ``backward`` then returns ``(dx, dcontext)``). **Output:** ``[batch, T,
    out_features or F]``. Keywords: ``mask`` (boolean, broadcastable to ``(batch, heads, T, S)``),
    ``cache_len`` (decoding, causal self-attention only; see the module docstring).
    ``head_dim`` defaults to ``F / num_heads``; ``num_kv_heads`` (default ``num_heads``) gives
    grouped-query attention; ``rope`` rotates q and k by their positions (cache offset included);
    ``dropout`` drops attention probabilities when ``train=True`` (needs a ``key``, as PyTorch);
    ``chunk_size`` selects the memory-efficient form. ``fwd`` keeps the input(s) and the
    attention op's residuals (``q, k, v``, the heads' output and each row's log-sum-exp);
    ``bwd`` starts from them, so the forward runs once.
    **Params:** ``{"q", "k", "v", "o"}``, each ``{"w": (in, out), "b": (out,)}``: ``q.w: (F, heads·d)``,
    ``k.w, v.w: (Fc, kv_heads·d)``, ``o.w: (heads·d, out)``; Glorot-uniform kernels, zero biases.
    From ``torch.nn.MultiheadAttention`` (``E`` = embed_dim, same head split):
    ``q.w = in_proj_weight[:E].T``, ``k.w = in_proj_weight[E:2E].T``, ``v.w = in_proj_weight[2E:].T``,
    biases the matching slices of ``in_proj_bias``, ``o.w = out_proj.weight.T``, ``o.b = out_proj.bias``.
    """
    kv = num_kv_heads or num_heads
    for what, n in (("num_heads", num_heads), ("num_kv_heads", kv)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"MultiHeadAttention: {what} must be a positive int, got {n!r}")
    if num_heads % kv:
        raise ValueError(f"MultiHeadAttention: num_heads {num_heads} must be a multiple of "
                         f"num_kv_heads {kv}")
    if not 0 <= dropout < 1:
        raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1), got {dropout!r}")
    name = f"MultiHeadAttention({num_heads})"
    w_init = w_init or inits.glorot_uniform()

    def shapes(shape):
        cross = not is_shape(shape)
        xs, cs = (shape if cross and len(shape) == 2 else (shape, shape))
        if not (is_shape(xs) and is_shape(cs) and len(xs) == 3 and len(cs) == 3
                and xs[0] == cs[0]):
            raise ValueError(f"{name}: expected input shape (batch, time, features) or a pair "
                             f"((batch, T, F), (batch, S, Fc)), got {shape}")
        d = head_dim or xs[2] // num_heads
        if head_dim is None and xs[2] % num_heads:
            raise ValueError(f"{name}: features {xs[2]} not divisible by num_heads {num_heads}; "
                             f"pass head_dim")
        if rope and d % 2:
            raise ValueError(f"{name}: rope needs an even head_dim, got {d}")
        return tuple(xs), tuple(cs), cross, d

    def init(key, input_shape):
        xs, cs, cross, d = shapes(input_shape)
        fo = out_features or xs[2]
        ks = jax.random.split(key, 4)
        sizes = {"q": (xs[2], num_heads * d), "k": (cs[2], kv * d), "v": (cs[2], kv * d),
                 "o": (num_heads * d, fo)}
        params = {n: {"w": w_init(k, s, default_dtype())} for k, (n, s) in zip(ks, sizes.items())}
        if use_bias:
            for n, s in sizes.items():
                params[n]["b"] = jnp.zeros((s[1],), default_dtype())
        return params, {}, xs[:2] + (fo,)

    def split(params, x):
        cross = isinstance(x, (tuple, list))
        xq, ctx = (x if cross and len(x) == 2 else (x, x))
        shapes((tuple(getattr(xq, "shape", ())), tuple(getattr(ctx, "shape", ()))))
        if xq.shape[2] != params["q"]["w"].shape[0] or ctx.shape[2] != params["k"]["w"].shape[0]:
            raise ValueError(f"{name}: input features {xq.shape[2]}/{ctx.shape[2]} do not match "
                             f"params q.w {params['q']['w'].shape}, k.w {params['k']['w'].shape}")
        return xq, ctx, cross, params["q"]["w"].shape[1] // num_heads

    def project(params, xq, ctx, d, q_pos, k_pos, fused):
        b, t, s = xq.shape[0], xq.shape[1], ctx.shape[1]
        if fused:                   # self-attention: one matmul with [W_q | W_k | W_v]
            w, bias = _fused(params, use_bias)
            q, k, v = jnp.split(dense(xq, w, bias), [num_heads * d, (num_heads + kv) * d], -1)
        else:
            q, k, v = (dense(inp, params[n]["w"], params[n].get("b"))
                       for n, inp in (("q", xq), ("k", ctx), ("v", ctx)))
        q, k, v = q.reshape(b, t, num_heads, d), k.reshape(b, s, kv, d), v.reshape(b, s, kv, d)
        if rope:
            q, k = rope_op(q, q_pos, rope_base), rope_op(k, k_pos, rope_base)
        return q, k, v

    def project_backward(params, xq, ctx, dq, dk, dv, fused):
        """``(grads of q, k, v params, dx, dcontext)`` from the heads' gradients."""
        if fused:
            w, _ = _fused(params, use_bias)
            dw, db, dx = dense_backward(xq, w, jnp.concatenate(
                [_merge(dq), _merge(dk), _merge(dv)], axis=-1), use_bias)
            cuts = [dq.shape[2] * dq.shape[3], (dq.shape[2] + dk.shape[2]) * dq.shape[3]]
            dws, dbs = jnp.split(dw, cuts, 1), (jnp.split(db, cuts) if use_bias else [None] * 3)
            return {n: _pack(a, c) for n, a, c in zip("qkv", dws, dbs)}, dx, 0
        gq, gk, gv = (dense_backward(inp, params[n]["w"], _merge(g), use_bias)
                      for n, inp, g in (("q", xq, dq), ("k", ctx, dk), ("v", ctx, dv)))
        grads = {n: _pack(*g[:2]) for n, g in zip("qkv", (gq, gk, gv))}
        return grads, gq[2], gk[2] + gv[2]

    def att_kw(key, train):
        rate = dropout if train else 0.0
        if rate and key is None:
            raise ValueError(f"{name}: train=True needs a key for attention dropout; pass "
                             f"key=jax.random.PRNGKey(...) to apply and backward (the same key)")
        return dict(causal=causal, chunk_size=chunk_size, dropout_rate=rate, dropout_key=key)

    def apply(params, state, x, *, key=None, train=False, mask=None, cache_len=None):
        if cache_len is not None:
            return decode(params, state, x, mask, cache_len)
        xq, ctx, cross, d = split(params, x)
        t, s = xq.shape[1], ctx.shape[1]
        q, k, v = project(params, xq, ctx, d, jnp.arange(t), jnp.arange(s), not cross)
        a = dot_product_attention(q, k, v, mask, **att_kw(key, train))          # (b, t, h, d)
        return dense(_merge(a), params["o"]["w"], params["o"].get("b")), state

    def fwd(params, state, x, *, key=None, train=False, mask=None, cache_len=None):
        if cache_len is not None:
            raise ValueError(f"{name}: fwd/backward does not run in decoding mode "
                             f"(cache_len given)")
        xq, ctx, cross, d = split(params, x)
        t, s = xq.shape[1], ctx.shape[1]
        q, k, v = project(params, xq, ctx, d, jnp.arange(t), jnp.arange(s), not cross)
        a, att = dot_product_attention_fwd(q, k, v, mask, **att_kw(key, train))   # (b, t, h, d)
        y = dense(_merge(a), params["o"]["w"], params["o"].get("b"))
        return y, state, {"x": (xq, ctx) if cross else xq, "att": att}

    def bwd(params, state, res, dy, *, key=None, train=False, mask=None, cache_len=None):
        cross = isinstance(res["x"], tuple)
        xq, ctx = res["x"] if cross else (res["x"], res["x"])
        a = res["att"]["o"]                                                   # (b, t, h, d)
        (b, t, h, d), s = a.shape, ctx.shape[1]
        if not hasattr(dy, "shape") or dy.shape != (b, t, params["o"]["w"].shape[1]):
            raise ValueError(f"{name}: dy shape {getattr(dy, 'shape', dy)} differs from the "
                             f"output shape {(b, t, params['o']['w'].shape[1])}")
        da = jnp.matmul(dy, params["o"]["w"].T).reshape(b, t, h, d)           # dA = dy W_oᵀ
        dq, dk, dv = dot_product_attention_bwd(res["att"], da, mask, **att_kw(key, train))
        if rope:
            dq = rope_backward(dq, jnp.arange(t), rope_base)
            dk = rope_backward(dk, jnp.arange(s), rope_base)
        grads, dx, dctx = project_backward(params, xq, ctx, dq, dk, dv, not cross)
        grads["o"] = _pack(*dense_backward(_merge(a), params["o"]["w"], dy, use_bias)[:2])
        return {n: grads[n] for n in "qkvo"}, ((dx, dctx) if cross else dx + dctx)

    def decode(params, cache, x, mask, cache_len):
        if isinstance(x, (tuple, list)) or not causal:
            raise ValueError(f"{name}: decoding (cache_len=) needs causal self-attention")
        xq, _, _, d = split(params, x)
        (b, t, _), dt = xq.shape, jnp.result_type(xq, params["k"]["w"])
        if not isinstance(cache_len, int) or cache_len < 1:
            raise ValueError(f"{name}: cache_len must be a positive int, got {cache_len!r}")
        if not cache:
            cache = {"k": jnp.zeros((b, cache_len, kv, d), dt),
                     "v": jnp.zeros((b, cache_len, kv, d), dt), "index": jnp.zeros((), jnp.int32)}
        if set(cache) != {"k", "v", "index"} or cache["k"].shape != (b, cache_len, kv, d):
            raise ValueError(f"{name}: expected a cache {{'k', 'v': {(b, cache_len, kv, d)}, "
                             f"'index'}}, got {jax.tree.map(jnp.shape, cache)}")
        idx = cache["index"]
        check_room(name, idx, t, cache_len)
        pos = idx + jnp.arange(t)
        q, k, v = project(params, xq, xq, d, pos, pos, True)
        kc = lax.dynamic_update_slice_in_dim(cache["k"], k.astype(dt), idx, axis=1)
        vc = lax.dynamic_update_slice_in_dim(cache["v"], v.astype(dt), idx, axis=1)
        a = dot_product_attention(q, kc, vc, mask, causal=True, q_offset=idx,
                                  chunk_size=chunk_size)                      # (b, t, h, d)
        y = dense(_merge(a), params["o"]["w"], params["o"].get("b"))
        return y, {"k": kc, "v": vc, "index": idx + t}

    return Layer(init, apply, fwd, bwd, name, keywords={"mask", "cache_len"},
                 stochastic=dropout > 0)


def _fused(params, use_bias):
    """``[W_q | W_k | W_v]`` and its bias: one projection matmul for self-attention."""
    w = jnp.concatenate([params[n]["w"] for n in "qkv"], axis=1)
    return w, (jnp.concatenate([params[n]["b"] for n in "qkv"]) if use_bias else None)


def _merge(a):
    """``(b, t, heads, d)`` → ``(b, t, heads·d)`` (explicit sizes: ``t`` may be 0)."""
    return a.reshape(a.shape[:2] + (a.shape[2] * a.shape[3],))


def _pack(dw, db):
    return {"w": dw} if db is None else {"w": dw, "b": db}


# --------------------------------------------------------------------------- decoding

def init_cache(model: Layer, params, state, x, max_len: int):
    """An empty decoding cache of capacity ``max_len`` for ``model`` — its state pytree in
    decoding form (``{"k", "v": [batch, max_len, kv_heads, d], "index"}`` per attention layer).

    ``x``: an input of the model with the right batch, feature shape and dtype (the prompt:
    token ids for a GPT, ``[batch, t, F]`` features for a layer); only ``x[:, :0]`` is used.
    Works for any model whose positional/attention layers take ``cache_len`` (``serial``,
    ``residual``, ``stack`` thread the cache as state; ``fnn.models.GPT`` too).

    >>> mha = MultiHeadAttention(2, causal=True)
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8))       # [batch, time, features]
    >>> params, state, _ = mha.init(jax.random.PRNGKey(1), x.shape)
    >>> cache = init_cache(mha, params, state, x, 8)                  # room for 8 positions
    >>> decode = jax.jit(lambda cache, x: decode_step(mha, params, cache, x, 8))
    >>> y01, cache = decode(cache, x[:, :2])                          # the prompt
    >>> y2, cache = decode(cache, x[:, 2:])                           # then one step at a time
    >>> full, _ = jax.jit(mha.apply)(params, state, x)                # one causal forward
    >>> bool(jnp.allclose(jnp.concatenate([y01, y2], axis=1), full, atol=1e-6))
    True
    """
    if isinstance(x, int):
        raise ValueError(f"init_cache: expected an input x of shape (batch, time, ...) (the "
                         f"prompt), got the int {x} (a batch size: pass the prompt instead)")
    if not hasattr(x, "shape") or len(x.shape) < 2:
        raise ValueError(f"init_cache: expected an input x of shape (batch, time, ...) (the "
                         f"prompt), got {getattr(x, 'shape', type(x).__name__)}")
    return model.apply(params, state, x[:, :0], cache_len=max_len)[1]


def decode_step(model: Layer, params, cache, x, max_len: int):
    """Feed the next positions ``x: [batch, t, ...]`` through ``model`` with ``cache``:
    ``(y, new_cache)``, equal to the matching rows of one causal forward over the whole sequence.
    Raises ``ValueError`` when the positions would run past ``max_len``."""
    return model.apply(params, cache, x, cache_len=max_len)
