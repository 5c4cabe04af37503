"""The chunked (memory-efficient) form of ``fnn.layers.attention.dot_product_attention``.

Queries and keys are cut into blocks of ``c``. The forward runs, per query block, an online
softmax over the key blocks (Rabe & Staats 2021; FlashAttention, Dao et al. 2022)::

    m' = max(m, rowmax S_ij),   l' = e^{m − m'} l + rowsum e^{S_ij − m'},
    O' = e^{m − m'} O + e^{S_ij − m'} V_j,      finally O / l and lse = m + log l

skipping blocks wholly above the causal diagonal. The backward walks the key blocks; for each it
visits the query blocks that see it, recomputes ``P_ij = exp(S_ij − lse_i)`` and accumulates::

    dV_j += P_ijᵀ dO_i,   dS_ij = P_ij ⊙ (dO_i V_jᵀ − rowsum(dO_i ⊙ O_i)),
    dQ_i += scale·dS_ij K_j,   dK_j += scale·dS_ijᵀ Q_i

so memory is linear in the sequence length. Private: use ``dot_product_attention(chunk_size=c)``.
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


def _blocks(a, n, c):
    """``[b, t, ...]`` → ``[n, b, ..., c, last]`` blocks of ``c`` along time (zero-padded)."""
    a = jnp.pad(a, [(0, 0), (0, n * c - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    a = a.reshape((a.shape[0], n, c) + a.shape[2:])                           # (b, n, c, ..., e)
    perm = (1, 0) + tuple(range(3, a.ndim - 1)) + (2, a.ndim - 1)
    return a.transpose(perm)                                                  # (n, b, ..., c, e)


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
        self.q = _blocks(q.reshape(b, t, kh, h // kh, d), self.nq, self.cq)    # (nq,b,kh,g,cq,d)
        self.k, self.v = _blocks(k, self.nk, self.ck), _blocks(v, self.nk, self.ck)  # (nk,b,kh,ck,·)
        self.mask = _pad5(mask5, self.nq * self.cq, self.nk * self.ck, False)
        self.bias = _pad5(bias5, self.nq * self.cq, self.nk * self.ck, 0)
        self.causal, self.scale, self.q_offset, self.rate, self.key = \
            causal, scale, q_offset, rate, key

    def logits(self, qi, kj, i, j):
        """Masked ``S`` of block ``(i, j)``: ``(b, kh, g, cq, ck)``, ``-inf`` where not allowed."""
        s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj) * self.scale
        bias = _tile(self.bias, i, j, self.cq, self.ck)
        if bias is not None:
            s = s + bias
        q_pos = self.q_offset + i * self.cq + jnp.arange(self.cq)
        k_pos = j * self.ck + jnp.arange(self.ck)
        padded = self.shape[4] if self.nk * self.ck > self.shape[4] else None
        ok = allowed(_tile(self.mask, i, j, self.cq, self.ck), q_pos, k_pos, self.causal, padded)
        return s if ok is None else jnp.where(ok, s, -jnp.inf)

    def keep(self, p, i, j):
        if not self.rate:
            return None
        return dropout_mask(jax.random.fold_in(jax.random.fold_in(self.key, i), j), self.rate,
                            p.shape)

    def seen(self, i, j):
        """Does query block ``i`` see any key of block ``j`` (causal)?"""
        return j * self.ck <= self.q_offset + i * self.cq + self.cq - 1

    def untile(self, o):
        """``(nq, b, kh, g, cq, e)`` → ``(b, t, h, e)``."""
        b, t, h = self.shape[:3]
        o = o.transpose(1, 0, 4, 2, 3, 5)                                     # (b,nq,cq,kh,g,e)
        return o.reshape(b, self.nq * self.cq, h, o.shape[-1])[:, :t]


def chunked_forward(tl: Tiles):
    """Online softmax per query block: returns ``O`` blocks and ``lse`` blocks (``+inf`` on
    rows allowed no key)."""
    b, t, h, d, s, kh, dv = tl.shape
    g = h // kh

    def row(_, xs):
        i, qi = xs

        def visit(carry, j, kj, vj):
            o, m, l = carry                                 # (b,kh,g,cq,dv), (b,kh,g,cq) x2
            sb = tl.logits(qi, kj, i, j)
            m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(sb, axis=-1)))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0)
            p = jnp.exp(sb - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            keep = tl.keep(p, i, j)
            pd = p if keep is None else jnp.where(keep, p / (1 - tl.rate), 0)
            o = alpha[..., None] * o + jnp.einsum("bkgqs,bksd->bkgqd", pd, vj)
            return o, m_new, alpha * l + jnp.sum(p, axis=-1)

        def step(carry, ys):
            j, kj, vj = ys
            if not tl.causal:
                return visit(carry, j, kj, vj), None
            return lax.cond(tl.seen(i, j), lambda c: visit(c, j, kj, vj), lambda c: c, carry), None

        init = (jnp.zeros((b, kh, g, tl.cq, dv), qi.dtype),
                jnp.full((b, kh, g, tl.cq), -jnp.inf, qi.dtype), jnp.zeros((b, kh, g, tl.cq), qi.dtype))
        (o, m, l), _ = lax.scan(step, init, (jnp.arange(tl.nk), tl.k, tl.v))
        empty = l == 0
        lse = jnp.where(empty, jnp.inf, jnp.where(jnp.isfinite(m), m, 0) + jnp.log(
            jnp.where(empty, 1, l)))
        return None, (o / jnp.where(empty, 1, l)[..., None], lse)

    _, (o, lse) = lax.scan(row, None, (jnp.arange(tl.nq), tl.q))
    return o, lse                                           # (nq,b,kh,g,cq,dv), (nq,b,kh,g,cq)


def chunked_backward(tl: Tiles, do, o, lse):
    """Key block by key block: ``dK_j, dV_j`` accumulate over the query blocks that see block
    ``j``; ``dQ`` accumulates in place. Each block's ``P`` is recomputed from ``lse``."""
    b, t, h, d, s, kh, dv = tl.shape
    dob = _blocks(do.reshape(b, t, kh, h // kh, dv), tl.nq, tl.cq)            # (nq,b,kh,g,cq,dv)
    delta = jnp.sum(dob * o, axis=-1)                       # rowsum(dO ⊙ O) = rowsum(dP ⊙ P)

    def col(dq, ys):
        j, kj, vj = ys

        def visit(i, carry):
            dq, dk, dvj = carry
            qi, doi = tl.q[i], dob[i]
            p = jnp.exp(tl.logits(qi, kj, i, j) - lse[i][..., None])        # (b,kh,g,cq,ck)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj)                    # dP = dO Vᵀ
            keep = tl.keep(p, i, j)
            if keep is not None:
                dp = jnp.where(keep, dp / (1 - tl.rate), 0)
                dvj = dvj + jnp.einsum("bkgqs,bkgqd->bksd", jnp.where(keep, p / (1 - tl.rate), 0), doi)
            else:
                dvj = dvj + jnp.einsum("bkgqs,bkgqd->bksd", p, doi)          # dV += Pᵀ dO
            ds = p * (dp - delta[i][..., None]) * tl.scale
            dq = dq.at[i].add(jnp.einsum("bkgqs,bksd->bkgqd", ds, kj))
            return dq, dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi), dvj

        first = 0
        if tl.causal:                       # first query block whose last row reaches key block j
            first = jnp.clip(-((tl.q_offset + tl.cq - 1 - j * tl.ck) // tl.cq), 0, tl.nq)
        zeros = (jnp.zeros((b, kh, tl.ck, d), kj.dtype), jnp.zeros((b, kh, tl.ck, dv), vj.dtype))
        dq, dk, dvj = lax.fori_loop(first, tl.nq, visit, (dq,) + zeros)
        return dq, (dk, dvj)

    dq, (dk, dvb) = lax.scan(col, jnp.zeros_like(tl.q), (jnp.arange(tl.nk), tl.k, tl.v))
    unk = lambda a: a.transpose(1, 0, 3, 2, 4).reshape(b, tl.nk * tl.ck, kh, a.shape[-1])[:, :s]
    return tl.untile(dq), unk(dk), unk(dvb)
