"""Attention: scaled dot-product attention (plain and chunked) with its hand-derived backward,
``MultiHeadAttention`` (grouped kv heads, rotary positions, dropout) and a KV cache for decoding.

Layout of ``jax.nn.dot_product_attention``: ``q: [batch, T, heads, d]``, ``k: [batch, S,
kv_heads, d]``, ``v: [batch, S, kv_heads, dv]``; query head ``h`` reads kv head
``h // (heads / kv_heads)`` (grouped-query attention; ``kv_heads = 1`` is multi-query)::

    S = scale · Q Kᵀ + bias,   P = softmax(S over allowed keys),   O = P V

and the backward, written out (``dS = P ⊙ (dP − rowsum(dP ⊙ P))`` is the softmax's VJP)::

    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP − rowsum(dP ⊙ P)),   dQ = scale·dS K,   dK = scale·dSᵀ Q

A query row allowed no key gets ``P = 0`` and so ``O = 0`` (never NaN; ``jax.nn`` gives the mean
of ``V`` there). ``bias`` is an additive constant (no gradient is returned for it).

**Chunked** (``chunk_size=c``, Rabe & Staats 2021; Dao et al. 2022): queries and keys in blocks of
``c``; each query block runs an online softmax over the key blocks (running max ``m``, sum ``l``,
unnormalized output), so no ``T × S`` matrix is ever held; with ``causal=True`` blocks above the
diagonal are skipped. Its backward recomputes each block's ``P = exp(S − lse)`` from the saved
log-sum-exp and uses ``rowsum(dP ⊙ P) = rowsum(dO ⊙ O)``; memory is linear in the length.

**Decoding.** Layers with positions take the keyword ``cache_len=L``: ``state`` is then the
explicit cache (``{}`` starts an empty one of capacity ``L``), the input holds the next positions,
and ``apply`` returns ``(y, new_cache)``. Composed with ``serial``/``residual``/``stack`` the whole
model's cache is its state pytree. :func:`init_cache` and :func:`decode_step` wrap this.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnn import initializers as inits
from fnn.core import Example, Layer, default_dtype, examples, is_shape
from fnn.layers.dense import dense, dense_backward
from fnn.layers._chunked_attention import (Tiles, additive, allowed, chunked_backward,
                                           chunked_forward)
from fnn.layers.dropout import dropout_mask
from fnn.layers.positional import check_room, rope as rope_op, rope_backward

__all__ = ["dot_product_attention", "dot_product_attention_backward", "dot_product_attention_vjp",
           "MultiHeadAttention", "init_cache", "decode_step"]

_NAME = "dot_product_attention"


# --------------------------------------------------------------------------- checks, masks

def _dims(q, k, v):
    for n, a in (("q", q), ("k", k), ("v", v)):
        if not hasattr(a, "ndim") or a.ndim != 4:
            raise ValueError(f"{_NAME}: expected {n} of shape (batch, time, heads, head_dim), "
                             f"got shape {getattr(a, 'shape', type(a).__name__)}")
    (b, t, h, d), (bk, s, kh, dk) = q.shape, k.shape
    if dk != d:
        raise ValueError(f"{_NAME}: q and k must have the same head_dim, got q {q.shape} "
                         f"and k {k.shape}")
    if bk != b or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{_NAME}: q, k, v must share the batch and k, v the (time, kv_heads) "
                         f"axes, got q {q.shape}, k {k.shape}, v {v.shape}")
    if h % kh:
        raise ValueError(f"{_NAME}: the {h} query heads must be a multiple of the {kh} "
                         f"key/value heads")
    return b, t, h, d, s, kh, v.shape[3]


def _as5(what, a, b, h, kh, t, s):
    """Check ``a`` broadcasts to ``(b, h, t, s)``; reshape to rank 5 ``(b|1, kh|1, g|1, t|1, s|1)``."""
    if a is None:
        return None
    full = (b, h, t, s)
    if not hasattr(a, "ndim") or a.ndim > 4 or any(
            x not in (1, f) for x, f in zip(a.shape[::-1], full[::-1])):
        raise ValueError(f"{_NAME}: {what} of shape {getattr(a, 'shape', a)} does not broadcast "
                         f"to (batch, heads, q_time, k_time) = {full}")
    if what == "mask" and a.dtype != jnp.bool_:
        raise TypeError(f"{_NAME}: mask must be boolean (True = may attend), got {a.dtype}")
    a = a.reshape((1,) * (4 - a.ndim) + a.shape)
    heads = (kh, h // kh) if a.shape[1] == h else (1, 1)
    return a.reshape(a.shape[:1] + heads + a.shape[2:])


# --------------------------------------------------------------------------- plain form
#
# Laid out heads-first, ``(b, kv_heads, g·t, d)``: the ``g`` query heads that share a kv head are
# stacked along time, so each (batch, kv head) is one matmul. Written for XLA:CPU's library
# fusions (YNNPACK): with the mask as an additive 0/−inf term, the scale folded into ``q``, O
# normalized after ``P̃V`` and the empty-row guards as ``max`` (no select), the whole forward
# fuses into one kernel — about twice as fast as the same maths with a boolean select and an
# ``isfinite`` guard. In the backward every product is arranged so that its left operand
# contracts over its last axis (``dVᵀ = dOᵀ P``, ``dKᵀ = Qᵀ dS``), the form those kernels take.

def _heads_first(a, kh, last=False):
    """``(b, t, h, d)`` → ``(b, kh, g·t, d)`` with ``g = h / kh`` (``last``: ``(b, kh, d, g·t)``)."""
    b, t, h, d = a.shape
    a = a.reshape(b, t, kh, h // kh, d)
    if last:
        return a.transpose(0, 2, 4, 3, 1).reshape(b, kh, d, (h // kh) * t)
    return a.transpose(0, 2, 3, 1, 4).reshape(b, kh, (h // kh) * t, d)


def _heads_last(a, h):
    """Inverse of :func:`_heads_first`: ``(b, kh, g·t, d)`` → ``(b, t, h, d)``."""
    b, kh, gt, d = a.shape
    g = h // kh
    return a.reshape(b, kh, g, gt // g, d).transpose(0, 3, 1, 2, 4).reshape(b, gt // g, h, d)


def _exp_scores(q, k, mask5, bias5, causal, scale, q_offset):
    """``(qf, kf, e, l)``: scaled heads-first ``q``, heads-first ``k``, ``e = exp(S − m)`` (``m``
    the row max, zero off the allowed keys) and ``l = max(rowsum(e), 1)``: a row with an allowed
    key has ``rowsum(e) ≥ 1`` (its max contributes ``exp(0)``), so ``l`` is its sum; a row with
    none has ``e = 0``, ``m`` clamped finite and ``l = 1``, so ``P = e / l`` and ``O`` are zero
    there, never NaN. The clamp is added as a constant so that autodiff of the forward sees
    ``∂l/∂rowsum = 1`` even at ``rowsum = 1`` (a lone allowed key), where ``max`` would split it."""
    b, t, h, _ = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    qf, kf = _heads_first(q * scale, kh), k.transpose(0, 2, 1, 3)
    s = jnp.matmul(qf, jnp.swapaxes(kf, -1, -2))                              # scale·Q Kᵀ
    ok = allowed(mask5, q_offset + jnp.arange(t), jnp.arange(s_len), causal)
    add = additive(ok, bias5, h // kh, t, s.dtype)
    if add is not None:
        s = s + add
    m = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), jnp.finfo(s.dtype).min)
    e = jnp.exp(s - lax.stop_gradient(m))
    l = jnp.sum(e, axis=-1, keepdims=True)
    return qf, kf, e, l + lax.stop_gradient(jnp.maximum(l, 1) - l)


def _drop(e, rate, key, q, k):
    """``(e ⊙ z / (1 − rate), z)``, ``z ~ Bernoulli(1 − rate)`` drawn in the score shape
    ``(b, kh, g, t, s)``; ``(e, None)`` at rate 0."""
    if not rate:
        return e, None
    b, t, h, _ = q.shape
    keep = dropout_mask(key, rate, (b, k.shape[2], h // k.shape[2], t, k.shape[1]))
    keep = keep.reshape(e.shape)
    return jnp.where(keep, e / (1 - rate), 0), keep


def _span(q, k, v, mask5, bias5, causal, scale, q_offset, rate, key):
    _, _, e, l = _exp_scores(q, k, mask5, bias5, causal, scale, q_offset)
    ed, _ = _drop(e, rate, key, q, k)
    return _heads_last(jnp.matmul(ed, v.transpose(0, 2, 1, 3)) / l, q.shape[2])   # O = P V


def _span_backward(q, k, v, do, mask5, bias5, causal, scale, q_offset, rate, key):
    h, kh = q.shape[2], k.shape[2]
    qf, kf, e, l = _exp_scores(q, k, mask5, bias5, causal, scale, q_offset)
    vf = v.transpose(0, 2, 1, 3)
    ed, keep = _drop(e, rate, key, q, k)
    o = jnp.matmul(ed, vf) / l                                                # the forward's O
    p, pd = e / l, ed / l                                                     # P, dropped P
    dvt = jnp.matmul(_heads_first(do, kh, last=True), pd)                     # dVᵀ = dOᵀ P
    dof = _heads_first(do, kh)
    dp = jnp.matmul(dof, jnp.swapaxes(vf, -1, -2))                            # dP = dO Vᵀ
    if keep is not None:
        dp = jnp.where(keep, dp / (1 - rate), 0)
    ds = p * (dp - jnp.sum(dof * o, axis=-1, keepdims=True))   # rowsum(dP ⊙ P) = rowsum(dO ⊙ O)
    dq = jnp.matmul(ds, kf) * scale
    dkt = jnp.matmul(_heads_first(q * scale, kh, last=True), ds)             # dKᵀ = scale·Qᵀ dS
    return _heads_last(o, h), (_heads_last(dq, h), dkt.transpose(0, 3, 1, 2),
                               dvt.transpose(0, 3, 1, 2))


# Causal block skipping: with a static offset, query rows a..b-1 see only keys < q_offset + b,
# so the plain form runs CAUSAL_BLOCKS query blocks, each against its key prefix (4 blocks do
# 62.5% of the work of one). Measured forward + backward, batch 16, 4 heads, d 32, on the 2-core
# box: T=128: 1 block 17.3 ms, 2: 13.3, 4: 11.8, 8: 13.8; T=256: 31.8 / 21.9 / 20.6 / 20.7.
CAUSAL_BLOCKS = 4
_MIN_BLOCK = 32


def _spans(t, s, causal, q_offset):
    """``[(a, b, kend)]``: query rows ``a..b-1`` attend to keys ``< kend`` only."""
    static = isinstance(q_offset, (int, np.integer))
    n = min(CAUSAL_BLOCKS, t // _MIN_BLOCK) if causal and static else 1
    cuts = [i * t // n for i in range(n + 1)] if n > 1 else [0, t]
    spans = [(a, b, min(s, q_offset + b) if n > 1 else s) for a, b in zip(cuts, cuts[1:])]
    return spans if spans[0][2] < s else [(0, t, s)]


def _cut(a5, a, b, kend, t, s):
    """Rows ``a..b-1`` and keys ``< kend`` of a rank-5 mask or bias (broadcast axes kept)."""
    if a5 is None:
        return None
    rows = slice(a, b) if a5.shape[3] == t else slice(None)
    keys = slice(0, kend) if a5.shape[4] == s else slice(None)
    return a5[:, :, :, rows, keys]


def _plain(q, k, v, mask5, bias5, causal, scale, q_offset, rate, key):
    t, s = q.shape[1], k.shape[1]
    spans = _spans(t, s, causal, q_offset)
    outs = []
    for i, (a, b, ke) in enumerate(spans):
        ki = key if len(spans) == 1 or key is None else jax.random.fold_in(key, i)
        outs.append(_span(q[:, a:b], k[:, :ke], v[:, :ke], _cut(mask5, a, b, ke, t, s),
                          _cut(bias5, a, b, ke, t, s), causal, scale, q_offset + a, rate, ki))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _plain_backward(q, k, v, do, mask5, bias5, causal, scale, q_offset, rate, key):
    t, s = q.shape[1], k.shape[1]
    spans = _spans(t, s, causal, q_offset)
    if len(spans) == 1:
        return _span_backward(q, k, v, do, mask5, bias5, causal, scale, q_offset, rate, key)
    os, dqs, dk, dv = [], [], 0, 0
    for i, (a, b, ke) in enumerate(spans):
        ki = None if key is None else jax.random.fold_in(key, i)
        o, (dq, dki, dvi) = _span_backward(
            q[:, a:b], k[:, :ke], v[:, :ke], do[:, a:b], _cut(mask5, a, b, ke, t, s),
            _cut(bias5, a, b, ke, t, s), causal, scale, q_offset + a, rate, ki)
        pad = [(0, 0), (0, s - ke), (0, 0), (0, 0)]
        os.append(o), dqs.append(dq)
        dk, dv = dk + jnp.pad(dki, pad), dv + jnp.pad(dvi, pad)
    return jnp.concatenate(os, axis=1), (jnp.concatenate(dqs, axis=1), dk, dv)


# --------------------------------------------------------------------------- public op

def _prepare(q, k, v, mask, bias, scale, chunk_size, rate, key):
    b, t, h, d, s, kh, dv = _dims(q, k, v)
    mask5 = _as5("mask", mask, b, h, kh, t, s)
    bias5 = _as5("bias", bias, b, h, kh, t, s)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_NAME}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not 0 <= rate < 1:
        raise ValueError(f"{_NAME}: dropout_rate must be in [0, 1), got {rate!r}")
    if rate and key is None:
        raise ValueError(f"{_NAME}: dropout_rate > 0 needs a dropout_key")
    return mask5, bias5, (1 / math.sqrt(d) if scale is None else scale), t == 0 or s == 0


def dot_product_attention(q, k, v, mask=None, *, causal=False, bias=None, scale=None,
                          chunk_size=None, q_offset=0, dropout_rate=0.0, dropout_key=None):
    """Scaled dot-product attention ``softmax(scale·QKᵀ + bias, allowed keys) V``.

    **Arguments:** ``q: [batch, T, heads, d]``; ``k: [batch, S, kv_heads, d]``;
    ``v: [batch, S, kv_heads, dv]`` (``heads`` a multiple of ``kv_heads``); ``mask``: boolean,
    broadcastable to ``(batch, heads, T, S)``, ``True`` where a query may attend; ``causal``: query
    ``i`` (at position ``q_offset + i``) sees keys ``0 .. q_offset + i`` (top-left aligned, as
    ``jax.nn`` and PyTorch's ``is_causal``); ``bias``: additive float, same broadcast;
    ``scale``: default ``1/√d``; ``chunk_size``: blocks of this many queries/keys with an online
    softmax (memory linear in length); ``dropout_rate``/``dropout_key``: dropout on ``P``
    (chunked: one mask per block from ``fold_in(fold_in(key, i), j)``; plain and causal over 64
    or more queries: one per query block from ``fold_in(key, i)``).
    **Returns:** ``[batch, T, heads, dv]``; rows allowed no key are zero.
    """
    mask5, bias5, scale, empty = _prepare(q, k, v, mask, bias, scale, chunk_size, dropout_rate,
                                          dropout_key)
    if empty:
        return jnp.zeros(q.shape[:3] + v.shape[3:], jnp.result_type(q, v))
    if chunk_size is None:
        return _plain(q, k, v, mask5, bias5, causal, scale, q_offset, dropout_rate, dropout_key)
    tl = Tiles(q, k, v, mask5, bias5, causal, scale, q_offset, chunk_size, dropout_rate,
                dropout_key)
    return tl.untile(chunked_forward(tl)[0])


def dot_product_attention_vjp(q, k, v, dout, mask=None, *, causal=False, bias=None, scale=None,
                              chunk_size=None, q_offset=0, dropout_rate=0.0, dropout_key=None):
    """``(out, (dq, dk, dv))``: :func:`dot_product_attention`'s output and its hand-derived VJP
    from one pass (what a layer's ``backward`` wants: it needs ``out`` for the output
    projection's gradient). Same arguments, plus ``dout`` shaped like the output."""
    rate, key = dropout_rate, dropout_key
    mask5, bias5, scale, empty = _prepare(q, k, v, mask, bias, scale, chunk_size, rate, key)
    out_shape = q.shape[:3] + v.shape[3:]
    if not hasattr(dout, "shape") or dout.shape != out_shape:
        raise ValueError(f"{_NAME}: dout shape {getattr(dout, 'shape', dout)} differs from the "
                         f"output shape {out_shape}")
    if empty:
        return jnp.zeros(out_shape, dout.dtype), (jnp.zeros_like(q), jnp.zeros_like(k),
                                                  jnp.zeros_like(v))
    if chunk_size is None:
        return _plain_backward(q, k, v, dout, mask5, bias5, causal, scale, q_offset, rate, key)
    tl = Tiles(q, k, v, mask5, bias5, causal, scale, q_offset, chunk_size, rate, key)
    o, lse = chunked_forward(tl)
    return tl.untile(o), chunked_backward(tl, dout, o, lse)


def dot_product_attention_backward(q, k, v, dout, mask=None, *, causal=False, bias=None,
                                   scale=None, chunk_size=None, q_offset=0, dropout_rate=0.0,
                                   dropout_key=None):
    """Hand-derived VJP of :func:`dot_product_attention` (same arguments, plus ``dout`` shaped
    like its output): ``(dq, dk, dv)``. Recomputes ``P`` (chunked: block by block)."""
    return dot_product_attention_vjp(q, k, v, dout, mask, causal=causal, bias=bias, scale=scale,
                                     chunk_size=chunk_size, q_offset=q_offset,
                                     dropout_rate=dropout_rate, dropout_key=dropout_key)[1]


# --------------------------------------------------------------------------- layer

def _mask_example(key, input_shape):
    b, t = input_shape[:2]
    mask = jax.random.bernoulli(key, 0.7, (b, 1, t, t))
    return {"mask": mask.at[0, 0, 1, :].set(False)}                         # one empty row


# use_bias=False in the sweep: the key bias's gradient is exactly zero in exact arithmetic
# (softmax ignores a constant added to a row), so vjp and backward agree only to roundoff, which
# the sweep's relative test cannot tell from an error; tests/test_attention.py checks use_bias=True
# and the chunked form (slow to run eagerly here).
@examples(Example((2, 5, 8), (2,), {"use_bias": False}),
          Example((2, 6, 8), (4,), {"num_kv_heads": 2, "causal": True, "rope": True,
                                    "dropout": 0.25, "use_bias": False},
                  call_kwargs=_mask_example),
          Example(((2, 4, 6), (2, 5, 3)), (2,), {"head_dim": 3, "out_features": 5,
                                                 "use_bias": False}))
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
    ``chunk_size`` selects the memory-efficient form.
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

    def backward(params, state, x, dy, *, key=None, train=False, mask=None, cache_len=None):
        if cache_len is not None:
            raise ValueError(f"{name}: backward does not run in decoding mode (cache_len given)")
        xq, ctx, cross, d = split(params, x)
        (b, t, _), s = xq.shape, ctx.shape[1]
        q_pos, k_pos = jnp.arange(t), jnp.arange(s)
        q, k, v = project(params, xq, ctx, d, q_pos, k_pos, not cross)
        da = jnp.matmul(dy, params["o"]["w"].T).reshape(b, t, num_heads, d)    # dA = dy W_oᵀ
        a, (dq, dk, dv) = dot_product_attention_vjp(q, k, v, da, mask, **att_kw(key, train))
        if rope:
            dq, dk = rope_backward(dq, q_pos, rope_base), rope_backward(dk, k_pos, rope_base)
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

    return Layer(init, apply, backward, name, frozenset({"mask", "cache_len"}),
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

def init_cache(layer: Layer, params, state, x, max_len: int):
    """An empty decoding cache of capacity ``max_len`` for ``layer`` — its state pytree in
    decoding form (``{"k", "v": [batch, max_len, kv_heads, d], "index"}`` per attention layer).

    ``x``: an input with the right batch, feature shape and dtype (e.g. the prompt); only
    ``x[:, :0]`` is used. Works for any model whose positional/attention layers take
    ``cache_len`` (``serial``, ``residual``, ``stack`` thread the cache as state).
    """
    return layer.apply(params, state, x[:, :0], cache_len=max_len)[1]


def decode_step(layer: Layer, params, cache, x, max_len: int):
    """Feed the next positions ``x: [batch, t, ...]`` through ``layer`` with ``cache``:
    ``(y, new_cache)``, equal to the matching rows of one causal forward over the whole sequence.
    Raises ``ValueError`` when the positions would run past ``max_len``."""
    return layer.apply(params, cache, x, cache_len=max_len)
