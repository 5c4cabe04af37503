"""Scaled dot-product attention (plain and chunked) with its hand-derived backward, as one
forward that keeps residuals and a backward that starts from them. The layer built on it,
``MultiHeadAttention``, is in ``fnn/layers/multi_head_attention.py``.

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
diagonal are skipped. Its forward keeps the output and each row's max ``m`` and sum ``l`` as
residuals; its backward recomputes each block's ``P = exp(S − m) / l`` from them (not from the
log-sum-exp ``m + log l``, which float32 rounds to ``m``'s last place) and uses
``rowsum(dP ⊙ P) = rowsum(dO ⊙ O)``; memory is linear in the length. The plain form keeps the
same (per query span), and its backward recomputes ``S`` and ``P`` in one go:
keeping the ``T × S`` matrix ``P`` instead was measured slower (benchmarks/RESULTS.md). Both
compute ``dQ = scale·dS (K − k̄)`` and take the mean out of ``dK`` (exact: each row of ``dS``
sums to 0), so a large common part of ``K``/``Q`` does not amplify ``dS``'s rounding.

``dot_product_attention_fwd`` → ``(out, res)`` and ``dot_product_attention_bwd(res, dout)`` →
``(dq, dk, dv)`` are the pair a layer's ``fwd``/``bwd`` call; ``dot_product_attention_vjp`` runs
both.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnn.layers._attention_tuning import check_chunk_size, resolve_chunk_size
from fnn.layers._chunked_attention import (Tiles, additive, allowed, chunked_backward,
                                           chunked_forward)
from fnn.layers.dropout import dropout_mask

__all__ = ["dot_product_attention", "dot_product_attention_fwd", "dot_product_attention_bwd",
           "dot_product_attention_vjp", "dot_product_attention_backward"]

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
# fuses into one kernel (the same maths with a boolean select and an ``isfinite`` guard split into
# five; timings in benchmarks/RESULTS.md, "Attention and transformers"). In the backward every
# product is arranged so that its left operand contracts over its last axis (``dVᵀ = dOᵀ P``,
# ``dKᵀ = Qᵀ dS``), the form those kernels take. The forward keeps each row's log-sum-exp; the
# backward recomputes ``S`` (one matmul) rather than read a kept ``P`` back from memory.

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


def _scores(q, k, mask5, bias5, causal, scale, q_offset):
    """``(qf, kf, S)``: scaled heads-first ``q``, heads-first ``k`` and ``S = scale·Q Kᵀ`` plus
    the additive mask (0/−inf) and bias, ``(b, kh, g·t, s)``."""
    b, t, h, _ = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    qf, kf = _heads_first(q * scale, kh), k.transpose(0, 2, 1, 3)
    s = jnp.matmul(qf, jnp.swapaxes(kf, -1, -2))                              # scale·Q Kᵀ
    ok = allowed(mask5, q_offset + jnp.arange(t), jnp.arange(s_len), causal)
    add = additive(ok, bias5, h // kh, t, s.dtype)
    return qf, kf, (s if add is None else s + add)


def _exp_scores(q, k, mask5, bias5, causal, scale, q_offset, with_max=False):
    """``(qf, kf, e, l)``: scaled heads-first ``q``, heads-first ``k``, ``e = exp(S − m)`` (``m``
    the row max, zero off the allowed keys) and ``l = max(rowsum(e), 1)``: a row with an allowed
    key has ``rowsum(e) ≥ 1`` (its max contributes ``exp(0)``), so ``l`` is its sum; a row with
    none has ``e = 0``, ``m`` clamped finite and ``l = 1``, so ``P = e / l`` and ``O`` are zero
    there, never NaN. The clamp is added as a constant so that autodiff of the forward sees
    ``∂l/∂rowsum = 1`` even at ``rowsum = 1`` (a lone allowed key), where ``max`` would split it.
    ``with_max``: ``m`` too."""
    qf, kf, s = _scores(q, k, mask5, bias5, causal, scale, q_offset)
    m = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), jnp.finfo(s.dtype).min)
    e = jnp.exp(s - lax.stop_gradient(m))
    l = jnp.sum(e, axis=-1, keepdims=True)
    l = l + lax.stop_gradient(jnp.maximum(l, 1) - l)
    return (qf, kf, e, l, m) if with_max else (qf, kf, e, l)


def _drop(e, rate, key, q, k):
    """``(e ⊙ z / (1 − rate), z)``, ``z ~ Bernoulli(1 − rate)`` drawn in the score shape
    ``(b, kh, g, t, s)``; ``(e, None)`` at rate 0."""
    if not rate:
        return e, None
    b, t, h, _ = q.shape
    keep = dropout_mask(key, rate, (b, k.shape[2], h // k.shape[2], t, k.shape[1]))
    keep = keep.reshape(e.shape)
    return jnp.where(keep, e / (1 - rate), 0), keep


def _span_fwd(q, k, v, mask5, bias5, causal, scale, q_offset, rate, key):
    """One query span's ``O`` (heads-last) and residuals ``(m, l, keep)``: each row's max and
    sum of ``exp(S − m)``, and the dropout mask (``None`` at rate 0). ``m`` and ``l`` rather
    than the log-sum-exp ``m + log l``: in float32 that sum rounds ``log l`` to a unit in the
    last place of ``m`` (1e-3 at logits of 1e4), and ``P = exp(S − lse)`` inherits the error,
    where ``exp(S − m) / l`` is the forward's ``P`` exactly."""
    _, _, e, l, m = _exp_scores(q, k, mask5, bias5, causal, scale, q_offset, with_max=True)
    ed, keep = _drop(e, rate, key, q, k)
    o = jnp.matmul(ed, v.transpose(0, 2, 1, 3)) / l                          # O = P V
    return _heads_last(o, q.shape[2]), (m, l, keep)


def _span_bwd(q, k, v, o, do, m, l, keep, mask5, bias5, causal, scale, q_offset, rate):
    """``(dq, dk, dv)`` of one span from its residuals (``o``, ``do``: heads-last): ``S`` is
    recomputed and ``P = exp(S − m) / l`` (zero off the allowed keys and on a row allowing
    none, whose ``m`` is the lowest float and ``l`` one)."""
    h, kh = q.shape[2], k.shape[2]
    qf, kf, s = _scores(q, k, mask5, bias5, causal, scale, q_offset)
    vf = v.transpose(0, 2, 1, 3)
    p = jnp.exp(s - m) / l                                                    # P
    pd = p if keep is None else jnp.where(keep, p / (1 - rate), 0)            # dropped P
    dvt = jnp.matmul(_heads_first(do, kh, last=True), pd)                     # dVᵀ = dOᵀ P
    dof = _heads_first(do, kh)
    dp = jnp.matmul(dof, jnp.swapaxes(vf, -1, -2))                            # dP = dO Vᵀ
    if keep is not None:
        dp = jnp.where(keep, dp / (1 - rate), 0)
    delta = jnp.sum(dof * _heads_first(o, kh), axis=-1, keepdims=True)  # rowsum(dP ⊙ P)
    ds = p * (dp - delta)
    # every row of dS sums to 0, so dQ = scale·dS (K − k̄) for any k̄ and Σ_j dK_j = 0: with the
    # keys' mean taken out (and dK's after), a large common part of K or Q (activations offset
    # by 100) does not turn dS's rounding into errors 100× the gradient (as it does autodiff's)
    dq = jnp.matmul(ds, kf - jnp.mean(kf, axis=2, keepdims=True)) * scale   # dQ = scale·dS K
    dkt = jnp.matmul(_heads_first(q * scale, kh, last=True), ds)             # dKᵀ = scale·Qᵀ dS
    dkt = dkt - jnp.mean(dkt, axis=-1, keepdims=True)
    return _heads_last(dq, h), dkt.transpose(0, 3, 1, 2), dvt.transpose(0, 3, 1, 2)


# Causal block skipping: with a static offset, query rows a..b-1 see only keys < q_offset + b,
# so the plain form runs CAUSAL_BLOCKS query blocks, each against its key prefix (4 blocks do
# 62.5% of the work of one). The choice was measured: benchmarks/RESULTS.md, "Attention and
# transformers", (a) item 3.
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


def _plain_fwd(q, k, v, mask5, bias5, causal, scale, q_offset, rate, key):
    """``(O, [(e, l, keep)] per span)``."""
    t, s = q.shape[1], k.shape[1]
    spans = _spans(t, s, causal, q_offset)
    outs, res = [], []
    for i, (a, b, ke) in enumerate(spans):
        ki = key if len(spans) == 1 or key is None else jax.random.fold_in(key, i)
        o, r = _span_fwd(q[:, a:b], k[:, :ke], v[:, :ke], _cut(mask5, a, b, ke, t, s),
                         _cut(bias5, a, b, ke, t, s), causal, scale, q_offset + a, rate, ki)
        outs.append(o), res.append(r)
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)), res


def _plain_bwd(q, k, v, o, do, spans_res, mask5, bias5, causal, scale, q_offset, rate):
    t, s = q.shape[1], k.shape[1]
    spans = _spans(t, s, causal, q_offset)
    if len(spans) == 1:
        return _span_bwd(q, k, v, o, do, *spans_res[0], mask5, bias5, causal, scale, q_offset,
                         rate)
    dqs, dk, dv = [], 0, 0
    for (a, b, ke), r in zip(spans, spans_res):
        dq, dki, dvi = _span_bwd(q[:, a:b], k[:, :ke], v[:, :ke], o[:, a:b], do[:, a:b], *r,
                                 _cut(mask5, a, b, ke, t, s), _cut(bias5, a, b, ke, t, s),
                                 causal, scale, q_offset + a, rate)
        pad = [(0, 0), (0, s - ke), (0, 0), (0, 0)]
        dqs.append(dq)
        dk, dv = dk + jnp.pad(dki, pad), dv + jnp.pad(dvi, pad)
    return jnp.concatenate(dqs, axis=1), dk, dv


# --------------------------------------------------------------------------- public op

def _prepare(q, k, v, mask, bias, scale, chunk_size, rate, key):
    b, t, h, d, s, kh, dv = _dims(q, k, v)
    mask5 = _as5("mask", mask, b, h, kh, t, s)
    bias5 = _as5("bias", bias, b, h, kh, t, s)
    check_chunk_size(chunk_size, _NAME)
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
    softmax (memory linear in length), or ``"auto"``: the tuner's choice for these shapes
    (``fnn/layers/_attention_tuning.py``; ``None`` with the tuner off or off the CPU);
    ``dropout_rate``/``dropout_key``: dropout on ``P`` (chunked: one mask per block from
    ``fold_in(fold_in(key, i), j)``; plain and causal over 64 or more queries: one per query
    block from ``fold_in(key, i)``).
    **Returns:** ``[batch, T, heads, dv]``; rows allowed no key are zero.

    >>> q = k = v = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4, 8))  # [batch, T, heads, d]
    >>> attend = jax.jit(dot_product_attention, static_argnames="causal")
    >>> out = attend(q, k, v, causal=True)
    >>> out.shape, bool(jnp.allclose(out[:, 0], v[:, 0]))          # query 0 sees key 0 only
    ((2, 5, 4, 8), True)
    """
    mask5, bias5, scale, empty = _prepare(q, k, v, mask, bias, scale, chunk_size, dropout_rate,
                                          dropout_key)
    if empty:
        return jnp.zeros(q.shape[:3] + v.shape[3:], jnp.result_type(q, v))
    chunk_size = resolve_chunk_size(chunk_size, q, k, v, mask, bias, causal=causal,
                                    q_offset=q_offset, dropout_rate=dropout_rate)
    if chunk_size is None:
        return _plain_fwd(q, k, v, mask5, bias5, causal, scale, q_offset, dropout_rate,
                          dropout_key)[0]
    tl = Tiles(q, k, v, mask5, bias5, causal, scale, q_offset, chunk_size, dropout_rate,
                dropout_key)
    return tl.untile(chunked_forward(tl)[0])


def dot_product_attention_fwd(q, k, v, mask=None, *, causal=False, bias=None, scale=None,
                              chunk_size=None, q_offset=0, dropout_rate=0.0, dropout_key=None):
    """``(out, res)``: :func:`dot_product_attention`'s output and the residuals its backward
    :func:`dot_product_attention_bwd` starts from — a dict of arrays: ``q, k, v``, ``o`` (the
    output) and each row's max and sum of exponentials (``spans``: per query span of the plain
    form, with its dropout mask; ``ml``: the chunked form's blocks), from which the backward recomputes
    ``P`` but never the forward's output. Same arguments."""
    rate, key = dropout_rate, dropout_key
    mask5, bias5, scale, empty = _prepare(q, k, v, mask, bias, scale, chunk_size, rate, key)
    res = {"q": q, "k": k, "v": v}
    chunk_size = resolve_chunk_size(chunk_size, q, k, v, mask, bias, causal=causal,
                                    q_offset=q_offset, dropout_rate=rate)
    if empty:
        out = jnp.zeros(q.shape[:3] + v.shape[3:], jnp.result_type(q, v))
    elif chunk_size is None:
        out, res["spans"] = _plain_fwd(q, k, v, mask5, bias5, causal, scale, q_offset, rate, key)
    else:
        tl = Tiles(q, k, v, mask5, bias5, causal, scale, q_offset, chunk_size, rate, key)
        o, res["ml"] = chunked_forward(tl)
        out = tl.untile(o)
    res["o"] = out
    return out, res


def dot_product_attention_bwd(res, dout, mask=None, *, causal=False, bias=None, scale=None,
                              chunk_size=None, q_offset=0, dropout_rate=0.0, dropout_key=None):
    """``(dq, dk, dv)``: the hand-derived VJP of :func:`dot_product_attention` from the
    residuals ``res`` of :func:`dot_product_attention_fwd` called with the same arguments;
    ``dout`` shaped like the output. ``chunk_size="auto"`` takes the form the forward took
    (read off ``res``)."""
    q, k, v, o = res["q"], res["k"], res["v"], res["o"]
    rate, key = dropout_rate, dropout_key
    mask5, bias5, scale, empty = _prepare(q, k, v, mask, bias, scale, chunk_size, rate, key)
    if not hasattr(dout, "shape") or dout.shape != o.shape:
        raise ValueError(f"{_NAME}: dout shape {getattr(dout, 'shape', dout)} differs from the "
                         f"output shape {o.shape}")
    if empty:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    if isinstance(chunk_size, str):     # "auto": the form the forward took, read off res
        chunk_size = (res["ml"].shape[3] * k.shape[2] // q.shape[2]) if "ml" in res else None
    if chunk_size is None:
        return _plain_bwd(q, k, v, o, dout, res["spans"], mask5, bias5, causal, scale, q_offset,
                          rate)
    tl = Tiles(q, k, v, mask5, bias5, causal, scale, q_offset, chunk_size, rate, key)
    return chunked_backward(tl, dout, tl.tile(o), res["ml"])


def dot_product_attention_vjp(q, k, v, dout, mask=None, *, causal=False, bias=None, scale=None,
                              chunk_size=None, q_offset=0, dropout_rate=0.0, dropout_key=None):
    """``(out, (dq, dk, dv))``: :func:`dot_product_attention`'s output and its hand-derived VJP
    from one forward (:func:`dot_product_attention_fwd` then :func:`dot_product_attention_bwd`).
    Same arguments, plus ``dout`` shaped like the output."""
    kw = dict(causal=causal, bias=bias, scale=scale, chunk_size=chunk_size, q_offset=q_offset,
              dropout_rate=dropout_rate, dropout_key=dropout_key)
    out, res = dot_product_attention_fwd(q, k, v, mask, **kw)
    return out, dot_product_attention_bwd(res, dout, mask, **kw)


def dot_product_attention_backward(q, k, v, dout, mask=None, *, causal=False, bias=None,
                                   scale=None, chunk_size=None, q_offset=0, dropout_rate=0.0,
                                   dropout_key=None):
    """Hand-derived VJP of :func:`dot_product_attention` (same arguments, plus ``dout`` shaped
    like its output): ``(dq, dk, dv)``. Runs the forward for its residuals, then the backward."""
    return dot_product_attention_vjp(q, k, v, dout, mask, causal=causal, bias=bias, scale=scale,
                                     chunk_size=chunk_size, q_offset=q_offset,
                                     dropout_rate=dropout_rate, dropout_key=dropout_key)[1]

