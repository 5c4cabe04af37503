"""Flash attention as Pallas kernels with a hand-derived backward (Dao et al. 2022, 2023).

``flash_attention_fwd(q, k, v)`` → ``(out, (m, l))`` runs one kernel that keeps, per query row,
only the running max ``m`` and sum ``l`` of ``exp(S − m)``: no ``T × S`` matrix is written to
memory. ``flash_attention_bwd`` recomputes the probabilities block by block from them, in two
kernels: one per query block for ``dQ``, one per key block for ``dK, dV`` (the ``g`` query heads
that share a kv head walk into the same key block, so grouped-query attention needs no reduction
afterwards). The maths is fnn's chunked attention (``fnn/layers/_chunked_attention.py``); the
kernel bodies are in ``_flash_kernels.py``, one source for both compilers:

* ``backend="mosaic"``: TPU (Mosaic). Blocks of 128; the keys and values of one (batch, kv
  head) — and in the key pass its queries and output gradients — are held in VMEM whole, so
  :func:`vmem_bytes` must stay under the chip's scoped VMEM (16 MiB by default).
* ``backend="triton"``: GPU (Triton). Blocks of 64 (powers of two of at least 16; the head
  dimension is zero-padded to one).
* ``interpret=True``: Pallas' interpreter, on any platform (CPU tests).

Supported: causal (top-left aligned, as ``dot_product_attention``), grouped-query attention, a
boolean ``mask`` broadcastable to ``(batch, heads, T, S)``, any lengths (padded to whole blocks
and masked), float32/bfloat16/float16 inputs (products and statistics in float32). Not here (use
``fnn.layers.attention.dot_product_attention``): an additive bias, dropout on the probabilities,
a traced ``q_offset`` (decoding).

``flash_attention`` is the forward with a ``jax.custom_vjp`` wired to the hand backward.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fnn.kernels import _flash_kernels as K

__all__ = ["flash_attention", "flash_attention_fwd", "flash_attention_bwd", "vmem_bytes"]

_NAME = "flash_attention"
BACKENDS = ("mosaic", "triton")
BLOCKS = {"mosaic": 128, "triton": 64}
# Each pallas_call declares its FLOPs, exponentials and bytes (``pl.CostEstimate``): XLA cannot
# look inside a custom call, so without it ``compiled.cost_analysis()`` counts none of the
# kernel's work. False drops the declarations (benchmarks/bench_flash_tpu.py compares).
DECLARE_COST = True


# --------------------------------------------------------------------------- checks, layout

def _dims(q, k, v):
    for n, a in (("q", q), ("k", k), ("v", v)):
        if not hasattr(a, "ndim") or a.ndim != 4:
            raise ValueError(f"{_NAME}: expected {n} of shape (batch, time, heads, head_dim), "
                             f"got {getattr(a, 'shape', type(a).__name__)}")
    (b, t, h, d), (s, kh) = q.shape, k.shape[1:3]
    if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3] or h % kh:
        raise ValueError(f"{_NAME}: expected q (b, T, heads, d), k (b, S, kv_heads, d), "
                         f"v (b, S, kv_heads, dv) with heads a multiple of kv_heads, got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if t == 0 or s == 0:
        raise ValueError(f"{_NAME}: empty sequence (q {q.shape}, k {k.shape}); use "
                         f"fnn.layers.attention.dot_product_attention")
    return b, t, h, d, s, kh, v.shape[3]


def _spec(block, index_map):
    """``pl.BlockSpec`` whose block indices are int32 also under ``jax_enable_x64`` (a Python
    ``0`` there is int64, which Mosaic cannot return)."""
    as32 = lambda x: np.int32(x) if isinstance(x, int) else x
    return pl.BlockSpec(block, lambda *ids: tuple(as32(x) for x in index_map(*ids)))


class _Plan:
    """Block sizes, padded sizes and the grid for one call."""

    def __init__(self, q, k, v, backend, block_q, block_k):
        if backend not in BACKENDS:
            raise ValueError(f"{_NAME}: backend must be one of {BACKENDS}, got {backend!r}")
        self.b, self.t, self.h, self.d, self.s, self.kh, self.dv = _dims(q, k, v)
        self.g, self.backend = self.h // self.kh, backend
        self.bq, self.bk = (self._block(block_q, self.t), self._block(block_k, self.s))
        self.tp, self.sp = -(-self.t // self.bq) * self.bq, -(-self.s // self.bk) * self.bk
        self.nq, self.nk = self.tp // self.bq, self.sp // self.bk
        pow2 = backend == "triton"                        # Triton loads power-of-2 tiles >= 16
        self.dp = max(16, pl.next_power_of_2(self.d)) if pow2 else self.d
        self.dvp = max(16, pl.next_power_of_2(self.dv)) if pow2 else self.dv

    def _block(self, block, n):
        if block is not None:
            if not isinstance(block, int) or block < 1:
                raise ValueError(f"{_NAME}: block sizes must be positive ints, got {block!r}")
            return block
        if self.backend == "mosaic":
            return BLOCKS["mosaic"]                       # (8, 128) tiles: whole lane blocks
        return min(BLOCKS["triton"], max(16, pl.next_power_of_2(n)))

    def stack_q(self, a, width):
        """``(b, T, h, e)`` → ``(b, kh, g·Tp, width)``: query heads stacked by kv head."""
        b, t, h, e = a.shape
        a = a.reshape(b, t, self.kh, self.g, e).transpose(0, 2, 3, 1, 4)
        a = jnp.pad(a, [(0, 0)] * 3 + [(0, self.tp - t), (0, width - e)])
        return a.reshape(b, self.kh, self.g * self.tp, width)

    def unstack_q(self, a, e):
        """Inverse of :meth:`stack_q` (padding dropped)."""
        a = a.reshape(self.b, self.kh, self.g, self.tp, a.shape[-1])[:, :, :, :self.t, :e]
        return a.transpose(0, 3, 1, 2, 4).reshape(self.b, self.t, self.h, e)

    def stack_kv(self, a, width):
        """``(b, S, kh, e)`` → ``(b, kh, Sp, width)``."""
        return jnp.pad(a.transpose(0, 2, 1, 3),
                       [(0, 0), (0, 0), (0, self.sp - self.s), (0, width - a.shape[3])])

    def unstack_kv(self, a, e):
        return a[:, :, :self.s, :e].transpose(0, 2, 1, 3)

    def rows(self, r, fill):
        """Per-row statistics ``(b, h, T)`` → ``(b, kh, 1, g·Tp)`` (padded rows ``fill``): one
        row per kv head, lane-dense (a ``(…, 1)`` column would take 128 lanes a float on TPU)."""
        r = r.reshape(self.b, self.kh, self.g, self.t).astype(jnp.float32)
        r = jnp.pad(r, [(0, 0)] * 3 + [(0, self.tp - self.t)], constant_values=fill)
        return r.reshape(self.b, self.kh, 1, self.g * self.tp)

    def unrows(self, r):
        return r.reshape(self.b, self.kh, self.g, self.tp)[..., :self.t].reshape(
            self.b, self.h, self.t)

    def masks(self, mask):
        """``(rows, cols)``: the mask as int8 ``(bm, hm, Tp, Sp)`` for the query-block kernels
        and ``(bm, kh|1, g|1, Sp, Tp)`` for the key pass; ``(None, None)`` without one."""
        if mask is None:
            return None, None
        full = (self.b, self.h, self.t, self.s)
        if not hasattr(mask, "ndim") or mask.ndim > 4 or any(
                x not in (1, f) for x, f in zip(mask.shape[::-1], full[::-1])):
            raise ValueError(f"{_NAME}: mask of shape {getattr(mask, 'shape', mask)} does not "
                             f"broadcast to (batch, heads, q_time, k_time) = {full}")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"{_NAME}: mask must be boolean (True = may attend), got "
                            f"{mask.dtype}")
        m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        m = jnp.broadcast_to(m, m.shape[:2] + (self.t, self.s)).astype(jnp.int8)
        m = jnp.pad(m, [(0, 0), (0, 0), (0, self.tp - self.t), (0, self.sp - self.s)])
        bm, hm = m.shape[:2]
        heads = (self.kh, self.g) if hm > 1 else (1, 1)
        cols = jnp.swapaxes(m, 2, 3).reshape((bm,) + heads + (self.sp, self.tp))
        return m, cols

    def params(self, semantics):
        if self.backend == "mosaic":
            from jax.experimental.pallas import tpu as pltpu
            return pltpu.CompilerParams(dimension_semantics=semantics)
        from jax.experimental.pallas import triton as plgpu
        return plgpu.CompilerParams(num_warps=4 if max(self.dp, self.dvp) <= 64 else 8,
                                    num_stages=2)

    def cost(self, causal, matmul_width, arrays, mask, row_floats, extra=0):
        """The kernel's declared cost: ``matmul_width`` (FLOPs per (query, key) pair / 2) over
        the pairs visited (the causal triangle or the rectangle), one exponential per pair,
        ``arrays`` (bytes read and written once each: the kernels fetch one (batch, kv head)'s
        whole keys or queries once) and ``extra`` bytes, the mask's bytes and ``row_floats``
        float32 per row."""
        t, s = self.t, self.s
        per = (t * (t + 1) // 2 if t <= s else s * (s + 1) // 2 + (t - s) * s) if causal \
            else t * s
        pairs = self.b * self.h * per
        byts = extra + sum(a.size * a.dtype.itemsize for a in arrays) + 4 * row_floats * self.b * \
            self.h * t + (0 if mask is None else mask.size)
        return _cost(flops=2 * pairs * matmul_width, transcendentals=pairs,
                     bytes_accessed=int(byts))


def _query_rows_mask_spec(pn, rows_mask):
    """The mask's block for a query-block program ``(b, j, i)``: the rows of query block
    ``i mod nq`` of head ``j·g + i div nq`` (broadcast batch/head axes read index 0)."""
    bm, hm = rows_mask.shape[:2]
    g, nq = pn.g, pn.nq
    return _spec((None, None, pn.bq, pn.sp), lambda b, j, i: (
        b if bm > 1 else 0, j * g + lax.div(i, np.int32(nq)) if hm > 1 else 0,
        lax.rem(i, np.int32(nq)), 0))


def _cost(**kw):
    return pl.CostEstimate(**kw) if DECLARE_COST else None


def vmem_bytes(q_shape, k_shape, v_shape, dtype, masked=False, block=BLOCKS["mosaic"]):
    """An estimate of the VMEM the Mosaic kernels need at most (the key pass's): the queries,
    output gradients and row statistics of one (batch, kv head), a key block, double-buffered;
    the forward's whole keys and values. Lanes round up to 128, sublanes to 8."""
    (_, t, h, d), (_, s, kh, _), dv = q_shape, k_shape, v_shape[3]
    g, isz, lane = h // kh, jnp.dtype(dtype).itemsize, lambda n: -(-n // 128) * 128
    tp, sp = -(-t // block) * block, -(-s // block) * block
    key_pass = (g * tp * (lane(d) + lane(dv)) * isz + 3 * 8 * lane(g * tp) * 4
                + block * (lane(d) + lane(dv)) * (2 * isz + 8) + masked * g * block * tp)
    forward = sp * (lane(d) + lane(dv)) * isz + block * (lane(d) + lane(dv) + 256) * 4 \
        + masked * block * sp
    return 2 * max(key_pass, forward)


# --------------------------------------------------------------------------- the op

# Jitted (static: everything but the arrays) so that a program tracing the same call again — the
# kernel branches of every platform are traced wherever a layer is, also on CPU — reuses the trace.
_STATIC = ("causal", "scale", "backend", "block_q", "block_k", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_attention_fwd(q, k, v, mask=None, *, causal=False, scale=None, backend="mosaic",
                        block_q=None, block_k=None, interpret=False):
    """``(out, (m, l))``: attention ``softmax(scale·QKᵀ, allowed keys) V`` by the Pallas kernel
    and each row's max ``m`` and sum ``l ≥ 1`` of ``exp(S − m)`` (``(batch, heads, T)``,
    float32: ``P = exp(S − m) / l``), the residuals :func:`flash_attention_bwd` starts from.

    **Arguments:** as ``fnn.layers.attention.dot_product_attention``: ``q: [b, T, heads, d]``,
    ``k: [b, S, kv_heads, d]``, ``v: [b, S, kv_heads, dv]``, ``mask`` boolean broadcastable to
    ``(b, heads, T, S)``, ``causal``, ``scale`` (default ``1/√d``); ``backend``: ``"mosaic"``
    (TPU) or ``"triton"`` (GPU); ``block_q``/``block_k``: block sizes (default 128 on TPU, 64 on
    GPU); ``interpret``: run in Pallas' interpreter (any platform). Rows allowed no key give 0.
    """
    pn = _Plan(q, k, v, backend, block_q, block_k)
    scale = 1 / math.sqrt(pn.d) if scale is None else float(scale)
    rows_mask, _ = pn.masks(mask)
    has_mask = rows_mask is not None
    bq, nq, g = pn.bq, pn.nq, pn.g
    q_spec = _spec((None, None, bq, pn.dp), lambda b, j, i: (b, j, i, 0))
    kv_spec = lambda w: _spec((None, None, pn.sp, w), lambda b, j, i: (b, j, 0, 0))
    row = _spec((None, None, 1, bq), lambda b, j, i: (b, j, 0, i))
    in_specs, args = [q_spec, kv_spec(pn.dp), kv_spec(pn.dvp)], [
        pn.stack_q(q, pn.dp), pn.stack_kv(k, pn.dp), pn.stack_kv(v, pn.dvp)]
    if has_mask:
        in_specs.append(_query_rows_mask_spec(pn, rows_mask))
        args.append(rows_mask)
    rows = (pn.b, pn.kh, g * pn.tp)
    kernel = functools.partial(K.forward_kernel, scale=scale, causal=causal, bq=bq, bk=pn.bk,
                               nq=nq, s_len=pn.s, has_mask=has_mask)
    o, m, l = pl.pallas_call(
        kernel, grid=(pn.b, pn.kh, g * nq), in_specs=in_specs,
        out_specs=[_spec((None, None, bq, pn.dvp), lambda b, j, i: (b, j, i, 0)), row, row],
        out_shape=[jax.ShapeDtypeStruct(rows + (pn.dvp,), q.dtype),
                   jax.ShapeDtypeStruct(rows[:2] + (1,) + rows[2:], jnp.float32),
                   jax.ShapeDtypeStruct(rows[:2] + (1,) + rows[2:], jnp.float32)],
        compiler_params=pn.params(("parallel",) * 3), interpret=interpret,
        cost_estimate=pn.cost(causal, pn.d + pn.dv, (q, k, v), rows_mask, 2,
                              extra=q.size // pn.d * pn.dv * q.dtype.itemsize),      # + out
        name="fnn_flash_forward")(*args)
    return pn.unstack_q(o, pn.dv), (pn.unrows(m), pn.unrows(l))


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_attention_bwd(q, k, v, out, stats, dout, mask=None, *, causal=False, scale=None,
                        backend="mosaic", block_q=None, block_k=None, interpret=False):
    """``(dq, dk, dv)``: the hand-derived VJP of :func:`flash_attention_fwd` (same arguments)
    from its output ``out`` and statistics ``stats = (m, l)``; ``dout`` shaped like ``out``.
    Two kernels: ``dQ`` per query block, ``dK, dV`` per key block; ``dK``'s mean over the keys
    is taken out after (it is 0 in exact arithmetic, as in fnn's plain form)."""
    pn = _Plan(q, k, v, backend, block_q, block_k)
    if not hasattr(dout, "shape") or dout.shape != out.shape or out.shape != q.shape[:3] + (
            pn.dv,):
        raise ValueError(f"{_NAME}: out {getattr(out, 'shape', out)} and dout "
                         f"{getattr(dout, 'shape', dout)} must both be {q.shape[:3] + (pn.dv,)}")
    m, l = stats
    if m.shape != (pn.b, pn.h, pn.t) or l.shape != m.shape:
        raise ValueError(f"{_NAME}: stats must be (m, l) of shape {(pn.b, pn.h, pn.t)}, got "
                         f"{getattr(m, 'shape', m)}, {getattr(l, 'shape', l)}")
    scale = 1 / math.sqrt(pn.d) if scale is None else float(scale)
    rows_mask, cols_mask = pn.masks(mask)
    has_mask = rows_mask is not None
    bq, bk, nq, g = pn.bq, pn.bk, pn.nq, pn.g
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (b, T, h)
    m, l, delta = pn.rows(m, 0.0), pn.rows(l, 1.0), pn.rows(delta.transpose(0, 2, 1), 0.0)
    qs, dos = pn.stack_q(q, pn.dp), pn.stack_q(dout, pn.dvp)
    ks, vs = pn.stack_kv(k, pn.dp), pn.stack_kv(v, pn.dvp)
    kbar = jnp.mean(k.astype(jnp.float32), axis=1).reshape(pn.b, pn.kh, 1, pn.d)
    kbar = jnp.pad(kbar, [(0, 0)] * 3 + [(0, pn.dp - pn.d)])

    # dQ: one query block per program, walking the key blocks
    row = _spec((None, None, 1, bq), lambda b, j, i: (b, j, 0, i))
    blk = lambda w: _spec((None, None, bq, w), lambda b, j, i: (b, j, i, 0))
    whole = lambda w: _spec((None, None, pn.sp, w), lambda b, j, i: (b, j, 0, 0))
    specs = [blk(pn.dp), whole(pn.dp), whole(pn.dvp), blk(pn.dvp), row, row, row,
             _spec((None, None, 1, pn.dp), lambda b, j, i: (b, j, 0, 0))]
    args = [qs, ks, vs, dos, m, l, delta, kbar]
    if has_mask:
        specs.append(_query_rows_mask_spec(pn, rows_mask))
        args.append(rows_mask)
    kernel = functools.partial(K.query_kernel, scale=scale, causal=causal, bq=bq, bk=bk, nq=nq,
                               s_len=pn.s, has_mask=has_mask)
    dq = pl.pallas_call(
        kernel, grid=(pn.b, pn.kh, g * nq), in_specs=specs, out_specs=blk(pn.dp),
        out_shape=jax.ShapeDtypeStruct(qs.shape, q.dtype),
        compiler_params=pn.params(("parallel",) * 3), interpret=interpret,
        cost_estimate=pn.cost(causal, 2 * pn.d + pn.dv, (q, k, v, dout, q), rows_mask, 3),
        name="fnn_flash_dq")(*args)

    # dK, dV: one key block per program, walking the query blocks of its g heads
    allq = lambda w: _spec((None, None, g * pn.tp, w), lambda b, j, i: (b, j, 0, 0))
    kblk = lambda w: _spec((None, None, bk, w), lambda b, j, i: (b, j, i, 0))
    rows = _spec((None, None, 1, g * pn.tp), lambda b, j, i: (b, j, 0, 0))
    specs = [allq(pn.dp), kblk(pn.dp), kblk(pn.dvp), allq(pn.dvp), rows, rows, rows]
    args = [qs, ks, vs, dos, m, l, delta]
    if has_mask:
        bm, km, gm = cols_mask.shape[:3]
        specs.append(_spec((None, None, gm, bk, pn.tp), lambda b, j, i: (
            b if bm > 1 else 0, j if km > 1 else 0, 0, i, 0)))
        args.append(cols_mask)
    kernel = functools.partial(K.key_kernel, scale=scale, causal=causal, bq=bq, bk=bk, nq=nq,
                               g=g, s_len=pn.s, s_pad=pn.sp, has_mask=has_mask)
    dk, dv = pl.pallas_call(
        kernel, grid=(pn.b, pn.kh, pn.nk), in_specs=specs,
        out_specs=[kblk(pn.dp), kblk(pn.dvp)],
        out_shape=[jax.ShapeDtypeStruct(ks.shape, k.dtype), jax.ShapeDtypeStruct(vs.shape,
                                                                                 v.dtype)],
        compiler_params=pn.params(("parallel",) * 3), interpret=interpret,
        cost_estimate=pn.cost(causal, 2 * pn.d + 2 * pn.dv, (q, k, v, dout, k, v), cols_mask, 3),
        name="fnn_flash_dkv")(*args)
    dk = pn.unstack_kv(dk, pn.d)
    dk = (dk - jnp.mean(dk.astype(jnp.float32), axis=1, keepdims=True)).astype(k.dtype)
    return pn.unstack_q(dq, pn.d), dk, pn.unstack_kv(dv, pn.dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, mask, causal, scale, backend, block_q, block_k, interpret):
    return flash_attention_fwd(q, k, v, mask, causal=causal, scale=scale, backend=backend,
                               block_q=block_q, block_k=block_k, interpret=interpret)[0]


def _flash_f(q, k, v, mask, causal, scale, backend, block_q, block_k, interpret):
    out, stats = flash_attention_fwd(q, k, v, mask, causal=causal, scale=scale, backend=backend,
                                     block_q=block_q, block_k=block_k, interpret=interpret)
    return out, (q, k, v, mask, out, stats)


def _flash_b(causal, scale, backend, block_q, block_k, interpret, res, dout):
    q, k, v, mask, out, stats = res
    grads = flash_attention_bwd(q, k, v, out, stats, dout, mask, causal=causal, scale=scale,
                                backend=backend, block_q=block_q, block_k=block_k,
                                interpret=interpret)
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return grads + (dmask,)


_flash.defvjp(_flash_f, _flash_b)


def flash_attention(q, k, v, mask=None, *, causal=False, scale=None, backend="mosaic",
                    block_q=None, block_k=None, interpret=False):
    """Attention by the Pallas kernel (see :func:`flash_attention_fwd` for the arguments), with
    its hand-derived backward as the VJP: ``jax.grad`` through it runs
    :func:`flash_attention_bwd`.

    >>> q = k = v = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 8))
    >>> out = flash_attention(q, k, v, causal=True, block_q=8, block_k=8, interpret=True)
    >>> out.shape, bool(jnp.allclose(out[:, 0], v[:, 0], atol=1e-6))     # query 0 sees key 0
    ((1, 5, 2, 8), True)
    """
    return _flash(q, k, v, mask, causal, scale, backend, block_q, block_k, interpret)
