"""The chunked (memory-efficient) form of ``fnn.layers.attention.dot_product_attention``.

Queries and keys are cut into blocks of ``c``. The forward runs, per query block, an online
softmax over the key blocks (Rabe & Staats 2021; FlashAttention, Dao et al. 2022)::

    m' = max(m, rowmax S_ij),   l' = e^{m − m'} l + rowsum e^{S_ij − m'},
    O' = e^{m − m'} O + e^{S_ij − m'} V_j,      finally O / l, keeping m and l

skipping blocks wholly above the causal diagonal. The backward walks the key blocks; for each it
visits the query blocks that see it, recomputes ``P_ij = exp(S_ij − m_i) / l_i`` (from ``m`` and
``l``, not the log-sum-exp ``m + log l``, which in float32 rounds ``log l`` to a unit in the last
place of ``m``: 1e-3 at logits of 1e4) and accumulates::

    dV_jᵀ += dO_iᵀ P_ij,   dS_ij = P_ij ⊙ (dO_i V_jᵀ − rowsum(dO_i ⊙ O_i)),
    dQ_i += scale·dS_ij K_j,   dK_jᵀ += scale·Q_iᵀ dS_ij

so memory is linear in the sequence length. Blocks are laid out heads-first with the ``g`` query
heads that share a kv head stacked along the block's rows, ``(b, kv_heads, g·c, d)``, in the
form the plain path uses (see ``attention.py``): additive masks, no selects in the inner loop,
``m`` started at the lowest finite float so that it never needs an ``isfinite`` guard, and every
product with its left operand contracting over its last axis. Private: use
``dot_product_attention(chunk_size=c)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fnn.layers.dropout import dropout_mask


def allowed(mask5, q_pos, k_pos, causal, s=None):
    """Boolean rank-5 array of allowed (query, key) pairs, or ``None`` when all are allowed.

    ``causal``: key position ≤ query position; ``s``: keys at positions ≥ ``s`` are padding.
    """
    pair = k_pos[None, :] <= q_pos[:, None] if causal else None               # (tq, tk)
    if s is not None:
        inside = jnp.broadcast_to((k_pos < s)[None, :], (q_pos.shape[0], k_pos.shape[0]))
        pair = inside if pair is None else pair & inside
    ok = None if pair is None else pair.reshape((1, 1, 1) + pair.shape)
    if mask5 is not None:
        ok = mask5 if ok is None else ok & mask5
    return ok


def additive(ok, bias5, g, t, dtype):
    """The rank-5 mask ``ok`` (0 allowed, −inf not) plus ``bias5``, reshaped for heads-first
    scores ``(b, kh, g·t, s)`` (broadcast axes kept), or ``None`` when there is neither."""
    add = None if ok is None else jnp.where(ok, jnp.zeros((), dtype), -jnp.inf)
    if bias5 is not None:
        add = bias5 if add is None else add + bias5
    if add is None:
        return None
    b_, k_, g_, t_, s_ = add.shape
    if g_ == 1 and (g == 1 or t_ == 1):
        return add.reshape(b_, k_, t_, s_)
    return jnp.broadcast_to(add, (b_, k_, g, t, s_)).reshape(b_, k_, g * t, s_)


def _blocks(a, n, c):
    """``[b, t, ...]`` → ``[n, b, ..., c, last]`` blocks of ``c`` along time (zero-padded)."""
    a = jnp.pad(a, [(0, 0), (0, n * c - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    a = a.reshape((a.shape[0], n, c) + a.shape[2:])                           # (b, n, c, ..., e)
    perm = (1, 0) + tuple(range(3, a.ndim - 1)) + (2, a.ndim - 1)
    return a.transpose(perm)                                                  # (n, b, ..., c, e)


def _query_blocks(a, kh, n, c, last=False):
    """``(b, t, h, e)`` → ``(n, b, kh, g·c, e)`` (``last``: ``(n, b, kh, e, g·c)``)."""
    b, t, h, e = a.shape
    a = _blocks(a.reshape(b, t, kh, h // kh, e), n, c)                         # (n,b,kh,g,c,e)
    if last:
        return a.transpose(0, 1, 2, 5, 3, 4).reshape(n, b, kh, e, (h // kh) * c)
    return a.reshape(n, b, kh, (h // kh) * c, e)


def _pad5(a, t, s, fill):
    if a is None:
        return None
    pads = [(0, 0)] * 3 + [(0, t - a.shape[3] if a.shape[3] > 1 else 0),
                           (0, s - a.shape[4] if a.shape[4] > 1 else 0)]
    return jnp.pad(a, pads, constant_values=fill)


def _tile(a, i, j, cq, ck):
    """Block ``(i, j)`` of a padded rank-5 mask/bias (axes of size 1 stay broadcast)."""
    if a is None:
        return None
    if a.shape[3] > 1:
        a = lax.dynamic_slice_in_dim(a, i * cq, cq, axis=3)
    if a.shape[4] > 1:
        a = lax.dynamic_slice_in_dim(a, j * ck, ck, axis=4)
    return a


class Tiles:
    """Everything a block ``(i, j)`` of the chunked form needs."""

    def __init__(self, q, k, v, mask5, bias5, causal, scale, q_offset, c, rate, key):
        (b, t, h, d), (s, kh, dv) = q.shape, (k.shape[1], k.shape[2], v.shape[3])
        self.shape = (b, t, h, d, s, kh, dv)
        self.cq, self.ck = min(c, t), min(c, s)
        self.nq, self.nk = -(-t // self.cq), -(-s // self.ck)
        self.q = _query_blocks(q * scale, kh, self.nq, self.cq)             # (nq,b,kh,g·cq,d)
        self.k, self.v = _blocks(k, self.nk, self.ck), _blocks(v, self.nk, self.ck)  # (nk,b,kh,ck,·)
        self.mask = _pad5(mask5, self.nq * self.cq, self.nk * self.ck, False)
        self.bias = _pad5(bias5, self.nq * self.cq, self.nk * self.ck, 0)
        self.causal, self.scale, self.q_offset, self.rate, self.key = \
            causal, scale, q_offset, rate, key

    def logits(self, qi, kj, i, j):
        """``S`` of block ``(i, j)``: ``(b, kh, g·cq, ck)``, ``-inf`` where not allowed."""
        s = jnp.matmul(qi, jnp.swapaxes(kj, -1, -2))                          # q holds the scale
        q_pos = self.q_offset + i * self.cq + jnp.arange(self.cq)
        k_pos = j * self.ck + jnp.arange(self.ck)
        padded = self.shape[4] if self.nk * self.ck > self.shape[4] else None
        ok = allowed(_tile(self.mask, i, j, self.cq, self.ck), q_pos, k_pos, self.causal, padded)
        add = additive(ok, _tile(self.bias, i, j, self.cq, self.ck), self.g, self.cq, s.dtype)
        return s if add is None else s + add

    @property
    def g(self):
        return self.shape[2] // self.shape[5]

    def drop(self, p, i, j):
        """``(p ⊙ z / (1 − rate), z)`` with block ``(i, j)``'s mask; ``(p, None)`` at rate 0."""
        if not self.rate:
            return p, None
        keep = dropout_mask(jax.random.fold_in(jax.random.fold_in(self.key, i), j), self.rate,
                            p.shape)
        return jnp.where(keep, p / (1 - self.rate), 0), keep

    def seen(self, i, j):
        """Does query block ``i`` see any key of block ``j`` (causal)?"""
        return j * self.ck <= self.q_offset + i * self.cq + self.cq - 1

    def tile(self, a):
        """``(b, t, h, e)`` → ``(nq, b, kh, g·cq, e)`` query blocks (the inverse of
        :meth:`untile`)."""
        return _query_blocks(a, self.shape[5], self.nq, self.cq)

    def untile(self, o):
        """``(nq, b, kh, g·cq, e)`` → ``(b, t, h, e)``."""
        b, t, h = self.shape[:3]
        nq, _, kh, _, e = o.shape
        o = o.reshape(nq, b, kh, self.g, self.cq, e).transpose(1, 0, 4, 2, 3, 5)  # (b,nq,cq,kh,g,e)
        return o.reshape(b, nq * self.cq, h, e)[:, :t]


def chunked_forward(tl: Tiles):
    """Online softmax per query block: returns ``O`` blocks and ``ml`` blocks, each row's max
    ``m`` and ``l = Σ exp(S − m)`` side by side (``l`` 0 on a row allowed no key)."""
    b, t, h, d, s, kh, dv = tl.shape
    rows = tl.g * tl.cq
    low = jnp.finfo(tl.q.dtype).min       # m starts finite: exp(S − m) needs no isfinite guard

    def row(_, xs):
        i, qi = xs

        def visit(carry, j, kj, vj):
            o, m, l = carry                                 # (b,kh,g·cq,dv), (b,kh,g·cq,1) x2
            sb = tl.logits(qi, kj, i, j)
            m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(sb, axis=-1, keepdims=True)))
            p = jnp.exp(sb - m_new)
            alpha = jnp.exp(m - m_new)
            pd, _ = tl.drop(p, i, j)
            o = alpha * o + jnp.matmul(pd, vj)
            return o, m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True)

        def step(carry, ys):
            j, kj, vj = ys
            if not tl.causal:
                return visit(carry, j, kj, vj), None
            return lax.cond(tl.seen(i, j), lambda c: visit(c, j, kj, vj), lambda c: c, carry), None

        init = (jnp.zeros((b, kh, rows, dv), qi.dtype), jnp.full((b, kh, rows, 1), low, qi.dtype),
                jnp.zeros((b, kh, rows, 1), qi.dtype))
        (o, m, l), _ = lax.scan(step, init, (jnp.arange(tl.nk), tl.k, tl.v))
        # l ≥ 1 on a row with an allowed key (its max contributed exp(0)); 0 on an empty row.
        # The clamp is a constant to autodiff, so ∂/∂l stays exact at l = 1.
        ml = jnp.concatenate([m, l], axis=-1)
        return None, (o / (l + lax.stop_gradient(jnp.maximum(l, 1) - l)), ml)

    _, (o, ml) = lax.scan(row, None, (jnp.arange(tl.nq), tl.q))
    return o, ml                                            # (nq,b,kh,g·cq,dv), (nq,b,kh,g·cq,2)


def chunked_backward(tl: Tiles, do, o, ml):
    """Key block by key block: ``dK_j, dV_j`` accumulate over the query blocks that see block
    ``j``; ``dQ`` accumulates in place. Each block's ``P`` is recomputed from ``m`` and ``l``
    (``ml``; an empty row's ``l = 0`` is read as 1, so its ``P = 0``)."""
    b, t, h, d, s, kh, dv = tl.shape
    dob = _query_blocks(do, kh, tl.nq, tl.cq)                                 # (nq,b,kh,g·cq,dv)
    dobt = _query_blocks(do, kh, tl.nq, tl.cq, last=True)                     # (nq,b,kh,dv,g·cq)
    qt = jnp.swapaxes(tl.q, -1, -2)                                           # (nq,b,kh,d,g·cq)
    delta = jnp.sum(dob * o, axis=-1, keepdims=True)        # rowsum(dO ⊙ O) = rowsum(dP ⊙ P)
    # every row of dS sums to 0, so dQ = scale·dS (K − k̄) for any k̄ and Σ_j dK_j = 0: with the
    # keys' mean taken out (and dK's after), a large common part of K or Q (activations offset
    # by 100) does not turn dS's rounding into errors 100× the gradient (as it does autodiff's)
    kbar = jnp.sum(tl.k, axis=(0, 3), keepdims=True)[0] / s                  # (b,kh,1,d)
    m, l = ml[..., :1], jnp.maximum(ml[..., 1:], 1)

    def col(dq, ys):
        j, kj, vj = ys
        kjc = kj - kbar

        def visit(i, carry):
            dq, dkt, dvt = carry
            p = jnp.exp(tl.logits(tl.q[i], kj, i, j) - m[i]) / l[i]          # (b,kh,g·cq,ck)
            pd, keep = tl.drop(p, i, j)
            dvt = dvt + jnp.matmul(dobt[i], pd)                               # dVᵀ += dOᵀ P
            dp = jnp.matmul(dob[i], jnp.swapaxes(vj, -1, -2))                 # dP = dO Vᵀ
            if keep is not None:
                dp = jnp.where(keep, dp / (1 - tl.rate), 0)
            ds = p * (dp - delta[i])
            dq = dq.at[i].add(jnp.matmul(ds, kjc) * tl.scale)
            return dq, dkt + jnp.matmul(qt[i], ds), dvt                       # dKᵀ += scale·Qᵀ dS

        first = 0
        if tl.causal:                       # first query block whose last row reaches key block j
            first = jnp.clip(-((tl.q_offset + tl.cq - 1 - j * tl.ck) // tl.cq), 0, tl.nq)
        zeros = (jnp.zeros((b, kh, d, tl.ck), kj.dtype), jnp.zeros((b, kh, dv, tl.ck), vj.dtype))
        dq, dkt, dvt = lax.fori_loop(first, tl.nq, visit, (dq,) + zeros)
        return dq, (dkt, dvt)

    dq, (dkt, dvt) = lax.scan(col, jnp.zeros_like(tl.q), (jnp.arange(tl.nk), tl.k, tl.v))
    unk = lambda a: a.transpose(1, 0, 4, 2, 3).reshape(b, tl.nk * tl.ck, kh, a.shape[3])[:, :s]
    dk = unk(dkt)
    return tl.untile(dq), dk - jnp.mean(dk, axis=1, keepdims=True), unk(dvt)
