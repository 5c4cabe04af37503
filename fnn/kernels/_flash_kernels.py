"""The three Pallas kernel bodies of flash attention: one source for Mosaic (TPU) and Triton (GPU).

Every array is laid out per (batch, kv head) with the ``g`` query heads that share the kv head
stacked along the rows, as fnn's plain form (``fnn/layers/attention.py``): ``q: (g·Tp, D)``,
``k, v: (Sp, D)``, each row's statistics as a column ``(g·Tp, 1)`` or, in the key-block pass, a row
``(1, g·Tp)``. ``Tp``, ``Sp`` are the lengths padded to whole blocks; keys at positions ``≥ s_len``
are masked, padded query rows are computed and thrown away by the caller. With ``S = scale·QKᵀ``
(``-inf`` where not allowed) the kernels compute, block by block::

    forward      m' = max(m, rowmax S_ij),  l' = e^{m−m'} l + rowsum e^{S_ij−m'},
                 acc' = e^{m−m'} acc + e^{S_ij−m'} V_j;   O = acc / l,  keeping m and l
    query pass   P = e^{S−m}/l,  dP = dO Vᵀ,  dS = P ⊙ (dP − δ),  dQ = scale·dS (K − k̄)
    key pass     Pᵀ = e^{Sᵀ−m}/l,  dV = Pᵀ dO,  dPᵀ = V dOᵀ,  dSᵀ = Pᵀ ⊙ (dPᵀ − δ),
                 dK = scale·dSᵀ Q

with ``δ = rowsum(dO ⊙ O)``. ``m`` starts at the lowest finite float, so ``e^{S−m}`` never needs an
``isfinite`` guard; ``l`` is stored as ``max(l, 1)`` (a row allowed no key has ``l = 0``: its ``O``
and ``P`` are then 0, never NaN), ``m`` and ``l`` rather than ``m + log l`` for the reason given
in ``attention.py``. ``dQ = scale·(dS K − rowsum(dS) k̄)`` is ``scale·dS (K − k̄)``: each row of
``dS`` sums to 0, and taking the keys' mean ``k̄`` out keeps a large common part of ``K`` from
amplifying the rounding of ``dS`` (fnn's plain and chunked forms do the same). Matmul operands stay
in the input dtype, products and statistics are float32. Only products ``A B`` and ``A Bᵀ`` are
used (both backends take them); the key pass works on transposed blocks so that the row statistics
broadcast along lanes on TPU instead of needing a transpose.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

F32, I32 = jnp.float32, np.int32              # int32 throughout, also under jax_enable_x64
LOW = float(jnp.finfo(jnp.float32).min)


def _nt(a, b):
    """``a bᵀ`` (contracting both last axes), float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _nn(a, b):
    """``a b``, float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _masked(x, q0, k0, *, causal, s_len, s_pad, mask, q_axis):
    """``x`` (a block of scores) with ``-inf`` off the allowed (query, key) pairs: queries at
    ``q0 + iota`` along ``q_axis``, keys at ``k0 + iota`` along the other axis; ``mask`` a loaded
    int8 block of the same shape or ``None``. One select per condition (Mosaic cannot always
    combine boolean vectors of different layouts)."""
    ki = lax.broadcasted_iota(jnp.int32, x.shape, 1 - q_axis) + k0
    if causal:
        x = jnp.where(ki <= lax.broadcasted_iota(jnp.int32, x.shape, q_axis) + q0, x, -jnp.inf)
    if s_len < s_pad:
        x = jnp.where(ki < s_len, x, -jnp.inf)
    if mask is not None:
        x = jnp.where(mask.astype(jnp.int32) != 0, x, -jnp.inf)
    return x


def _causal_hi(q0, bq, bk, nk):
    """Number of key blocks a query block starting at ``q0`` sees (causal)."""
    return jnp.minimum(lax.div(q0 + I32(bq + bk - 1), I32(bk)), I32(nk))   # no signed //: Mosaic


def _transpose_vector(x, axis):
    """A ``(n, 1)`` column as a ``(1, n)`` row (``axis=0``) or back (``axis=1``), through a
    masked sum with the identity: a relayout neither compiler has to support (n² work, small
    beside a block's n²·d)."""
    n = max(x.shape)
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, x, 0.0), axis=axis, keepdims=True)


def _loop(lo, hi, body, carry):
    """``fori_loop`` with an int32 index under any ``jax_enable_x64`` (with static bounds,
    ``fori_loop`` becomes a scan whose counter is int64 there, which Mosaic cannot lower)."""
    def step(c):
        i, x = c
        return i + I32(1), body(i, x)
    return lax.while_loop(lambda c: c[0] < hi, step, (jnp.asarray(lo, jnp.int32), carry))[1]


def forward_kernel(*refs, scale, causal, bq, bk, nq, s_len, has_mask):
    """Grid ``(batch, kv head, g·nq)``: one query block against all the keys it sees."""
    q_ref, k_ref, v_ref = refs[:3]
    mask_ref = refs[3] if has_mask else None
    o_ref, m_ref, l_ref = refs[-3:]
    s_pad = k_ref.shape[0]
    nk = s_pad // bk
    q0 = lax.rem(pl.program_id(2), I32(nq)) * I32(bq)
    q = q_ref[...]

    def body(j, carry):
        acc, m, l = carry
        k0 = pl.multiple_of(j * I32(bk), bk)
        k = k_ref[pl.ds(k0, bk), :]
        s = _nt(q, k) * scale
        mask = None if mask_ref is None else mask_ref[:, pl.ds(k0, bk)]
        s = _masked(s, q0, k0, causal=causal, s_len=s_len, s_pad=s_pad, mask=mask, q_axis=0)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        v = v_ref[pl.ds(k0, bk), :]
        acc = alpha * acc + _nn(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)

    init = (jnp.zeros((bq, o_ref.shape[-1]), F32), jnp.full((bq, 1), LOW, F32),
            jnp.zeros((bq, 1), F32))
    hi = _causal_hi(q0, bq, bk, nk) if causal else I32(nk)
    acc, m, l = _loop(I32(0), hi, body, init)
    l = jnp.maximum(l, 1.0)
    o_ref[...] = (acc * (1.0 / l)).astype(o_ref.dtype)
    m_ref[...] = _transpose_vector(m, 0)                      # rows: lane-dense in memory
    l_ref[...] = _transpose_vector(l, 0)


def query_kernel(*refs, scale, causal, bq, bk, nq, s_len, has_mask):
    """Grid ``(batch, kv head, g·nq)``: ``dQ`` of one query block, walking the key blocks."""
    q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref, kbar_ref = refs[:8]
    mask_ref = refs[8] if has_mask else None
    dq_ref = refs[-1]
    s_pad = k_ref.shape[0]
    nk = s_pad // bk
    q0 = lax.rem(pl.program_id(2), I32(nq)) * I32(bq)
    q, do = q_ref[...], do_ref[...]
    m, l, delta = (_transpose_vector(r[...], 1) for r in (m_ref, l_ref, d_ref))   # columns
    inv_l = 1.0 / l

    def body(j, carry):
        dq, rs = carry
        k0 = pl.multiple_of(j * I32(bk), bk)
        k, v = k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :]
        s = _nt(q, k) * scale
        mask = None if mask_ref is None else mask_ref[:, pl.ds(k0, bk)]
        s = _masked(s, q0, k0, causal=causal, s_len=s_len, s_pad=s_pad, mask=mask, q_axis=0)
        p = jnp.exp(s - m) * inv_l                                           # P
        ds = (p * (_nt(do, v) - delta)).astype(k.dtype)                      # P ⊙ (dO Vᵀ − δ)
        return dq + _nn(ds, k), rs + jnp.sum(ds.astype(F32), axis=1, keepdims=True)

    init = (jnp.zeros((bq, dq_ref.shape[-1]), F32), jnp.zeros((bq, 1), F32))
    hi = _causal_hi(q0, bq, bk, nk) if causal else I32(nk)
    dq, rs = _loop(I32(0), hi, body, init)
    dq_ref[...] = ((dq - rs * kbar_ref[...]) * scale).astype(dq_ref.dtype)


def key_kernel(*refs, scale, causal, bq, bk, nq, g, s_len, s_pad, has_mask):
    """Grid ``(batch, kv head, nk)``: ``dK, dV`` of one key block, walking the query blocks of
    the ``g`` heads that read it (causal: only those at or below the diagonal)."""
    q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref = refs[:7]
    mask_ref = refs[7] if has_mask else None
    dk_ref, dv_ref = refs[-2:]
    k0 = pl.program_id(2) * I32(bk)
    k, v = k_ref[...], v_ref[...]
    first = lax.div(k0, I32(bq)) if causal else I32(0)

    def head(hh, carry):
        def body(ip, carry):
            dk, dv = carry
            r0 = pl.multiple_of((hh * I32(nq) + ip) * I32(bq), bq)
            q, do = q_ref[pl.ds(r0, bq), :], do_ref[pl.ds(r0, bq), :]
            st = _nt(k, q) * scale                                            # Sᵀ (bk, bq)
            mask = None
            if mask_ref is not None:
                mask = mask_ref[hh if mask_ref.shape[0] > 1 else 0, :, pl.ds(ip * I32(bq), bq)]
            st = _masked(st, ip * I32(bq), k0, causal=causal, s_len=s_len, s_pad=s_pad, mask=mask,
                         q_axis=1)
            m, l = m_ref[:, pl.ds(r0, bq)], l_ref[:, pl.ds(r0, bq)]
            pt = jnp.exp(st - m) * (1.0 / l)                                  # Pᵀ
            dv = dv + _nn(pt.astype(do.dtype), do)                            # dV += Pᵀ dO
            dst = pt * (_nt(v, do) - d_ref[:, pl.ds(r0, bq)])                 # dSᵀ
            return dk + _nn(dst.astype(q.dtype), q), dv                       # dK += dSᵀ Q

        return _loop(first, I32(nq), body, carry)

    init = (jnp.zeros((bk, dk_ref.shape[-1]), F32), jnp.zeros((bk, dv_ref.shape[-1]), F32))
    dk, dv = _loop(I32(0), I32(g), head, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
