"""``MultiHeadAttention``'s attention op, formulated per platform when the program is lowered:
the Pallas flash kernels (``fnn/kernels``) on TPU and CUDA, fnn's jnp forms (``attention.py``)
elsewhere, through ``jax.lax.platform_dependent`` — so a program exported or compiled for TPU from
a CPU host carries the kernel, not the host's formulation. ``fnn.kernels.flash_attention_mode``
switches it (``"never"``: the jnp forms only, no ``platform_dependent``; ``"always"``: the kernels
on every platform, interpreted on CPU).

All branches of a ``platform_dependent`` return the same types, so the residuals take one form:
``q, k, v``, the output ``o`` and each row's max ``m`` and sum ``l ≥ 1`` of ``exp(S − m)`` as
float32 ``(batch, heads, T)``. The jnp forms keep the same numbers in their own layout (per query
span, or per chunk) and dtype; :func:`_to_stats` / :func:`_from_stats` convert exactly, so on CPU
the forward and the hand backward compute what they computed before.

Autodiff of ``apply`` (``jax.vjp``) differentiates the jnp branch as before and the kernel
branches through ``jax.custom_vjp`` with the hand backward (Pallas calls have no transpose); the
statistics are cut from the graph (``stop_gradient``). Forward-mode autodiff (``jax.jvp``) cannot
go through a ``custom_vjp``: in a program for TPU/GPU it needs ``flash_attention_mode("never")``
(on CPU it differentiates the jnp branch).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnn.kernels._switch import current_mode
from fnn.kernels._flash import flash_attention_bwd, flash_attention_fwd, vmem_bytes
from fnn.layers.attention import dot_product_attention_bwd, dot_product_attention_fwd

# The Mosaic kernels hold one (batch, kv head)'s keys and values (and, in the key pass, its
# queries) in VMEM: above this estimate (a v5e core's default scoped VMEM is 16 MiB) the TPU
# branch runs the jnp form instead.
VMEM_BUDGET = 12 << 20


KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def usable(q, k, v, rate, q_offset) -> bool:
    """Can this call take the flash form? Not when the mode is ``"never"``, with dropout, in
    decoding (a traced ``q_offset``), on an empty sequence or in float64 (the jnp forms keep
    its precision). Decided at trace time."""
    return (current_mode() != "never" and not rate and isinstance(q_offset, (int, np.integer))
            and q_offset == 0 and q.shape[1] > 0 and k.shape[1] > 0
            and q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES)


# --------------------------------------------------------------------------- jnp forms' stats

def _to_stats(res, q, k, causal, chunk_size):
    """The jnp form's residual ``m``, ``l`` → float32 ``(b, h, T)`` each."""
    b, t, h, _ = q.shape
    kh, g = k.shape[2], h // k.shape[2]
    if chunk_size is None:
        parts = [(m.reshape(b, kh, g, -1), l.reshape(b, kh, g, -1)) for m, l, _ in res["spans"]]
        m, l = (jnp.concatenate(p, axis=-1) for p in zip(*parts))
    else:
        ml = res["ml"]                                                       # (nq,b,kh,g·c,2)
        nq, c = ml.shape[0], ml.shape[3] // g
        ml = ml.reshape(nq, b, kh, g, c, 2).transpose(1, 2, 3, 0, 4, 5)
        ml = ml.reshape(b, kh, g, nq * c, 2)[:, :, :, :t]
        m, l = ml[..., 0], jnp.maximum(ml[..., 1], 1)                       # l of P = e / l
    return (m.reshape(b, h, t).astype(jnp.float32), l.reshape(b, h, t).astype(jnp.float32))


def _from_stats(m, l, q, k, causal, chunk_size):
    """Inverse of :func:`_to_stats`: the jnp form's residual entries (``spans`` or ``ml``)."""
    b, t, h, _ = q.shape
    kh = k.shape[2]
    g, dt = h // kh, jnp.result_type(q, k)
    m, l = m.reshape(b, kh, g, t).astype(dt), l.reshape(b, kh, g, t).astype(dt)
    if chunk_size is None:
        col = lambda a, lo, hi: a[..., lo:hi].reshape(b, kh, g * (hi - lo), 1)
        cuts = np.cumsum([0] + [sp[0].shape[2] // g for sp in _span_shapes(q, k, causal)])
        return {"spans": [(col(m, lo, hi), col(l, lo, hi), None)
                          for lo, hi in zip(cuts, cuts[1:])]}
    c = min(chunk_size, t)
    nq = -(-t // c)
    pad = lambda a, fill: jnp.pad(a, [(0, 0)] * 3 + [(0, nq * c - t)], constant_values=fill)
    ml = jnp.stack([pad(m, 0), pad(l, 1)], axis=-1).reshape(b, kh, g, nq, c, 2)
    return {"ml": ml.transpose(3, 0, 1, 2, 4, 5).reshape(nq, b, kh, g * c, 2)}


def _span_shapes(q, k, causal):
    """The plain form's per-span residual shapes (its query spans, from its own forward traced
    abstractly: the spans are that form's choice)."""
    fwd = lambda q, k: dot_product_attention_fwd(q, k, k, causal=causal)[1]["spans"]
    return jax.eval_shape(fwd, jax.ShapeDtypeStruct(q.shape, q.dtype),
                          jax.ShapeDtypeStruct(k.shape, k.dtype))


def _jnp_fwd(q, k, v, mask, causal, chunk_size):
    out, res = dot_product_attention_fwd(q, k, v, mask, causal=causal, chunk_size=chunk_size)
    return (out,) + _to_stats(res, q, k, causal, chunk_size)


def _jnp_bwd(q, k, v, o, m, l, do, mask, causal, chunk_size):
    res = {"q": q, "k": k, "v": v, "o": o, **_from_stats(m, l, q, k, causal, chunk_size)}
    return dot_product_attention_bwd(res, do, mask, causal=causal, chunk_size=chunk_size)


# --------------------------------------------------------------------------- kernel branches

def _fits(backend, q, k, v, mask):
    """Does the kernel take this call? Mosaic: float32/bfloat16 (float16 does not lower for
    TPU) and the VMEM estimate within :data:`VMEM_BUDGET`."""
    if backend != "mosaic":
        return True
    return q.dtype in (jnp.float32, jnp.bfloat16) and vmem_bytes(
        q.shape, k.shape, v.shape, q.dtype, mask is not None) <= VMEM_BUDGET


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _kernel_fwd(q, k, v, mask, causal, backend, interpret):
    out, (m, l) = flash_attention_fwd(q, k, v, mask, causal=causal, backend=backend,
                                      interpret=interpret)
    return out, m, l


def _kernel_fwd_f(q, k, v, mask, causal, backend, interpret):
    out, m, l = _kernel_fwd(q, k, v, mask, causal, backend, interpret)
    return (out, m, l), (q, k, v, mask, out, m, l)


def _kernel_fwd_b(causal, backend, interpret, res, cts):
    q, k, v, mask, out, m, l = res                  # the cotangents of m, l are zero: callers
    grads = flash_attention_bwd(q, k, v, out, (m, l), cts[0], mask, causal=causal,  # cut them
                                backend=backend, interpret=interpret)
    return grads + (None if mask is None else np.zeros(mask.shape, jax.dtypes.float0),)


_kernel_fwd.defvjp(_kernel_fwd_f, _kernel_fwd_b)


def _fwd_branch(backend, interpret, causal, chunk_size):
    def run(q, k, v, mask):
        if not _fits(backend, q, k, v, mask):
            return _jnp_fwd(q, k, v, mask, causal, chunk_size)
        out, m, l = _kernel_fwd(q, k, v, mask, causal, backend, interpret)
        return out.astype(jnp.result_type(q, v)), m, l
    return run


def _bwd_branch(backend, interpret, causal, chunk_size):
    def run(q, k, v, o, m, l, do, mask):
        if not _fits(backend, q, k, v, mask):
            return _jnp_bwd(q, k, v, o, m, l, do, mask, causal, chunk_size)
        return flash_attention_bwd(q, k, v, o, (m, l), do, mask, causal=causal, backend=backend,
                                   interpret=interpret)
    return run


def _choose(args, branch, jnp_form):
    """``platform_dependent`` over the kernels and ``jnp_form``: ``"auto"`` takes the Mosaic
    kernel on TPU (compiled deviceless for v5e in the suite) and ``jnp_form`` elsewhere — the
    Triton kernel has only been lowered, never compiled or run on a GPU, so CUDA takes it only
    with ``"always"`` (which also runs the interpreted kernel on other platforms)."""
    always = current_mode() == "always"
    default = branch("mosaic", True) if always else jnp_form
    cuda = branch("triton", False) if always else jnp_form
    return lax.platform_dependent(*args, default=default, tpu=branch("mosaic", False), cuda=cuda)


# --------------------------------------------------------------------------- the op

def attend(q, k, v, mask=None, *, causal=False, chunk_size=None):
    """``(out, res)``: attention of ``q: [b, T, h, d]`` over ``k, v: [b, S, kv_heads, ·]`` (scale
    ``1/√d``, no dropout, queries from position 0) and the residuals of :func:`attend_backward`:
    ``q, k, v, o`` and the float32 row statistics ``m, l`` ``(b, h, T)``."""
    jax.eval_shape(lambda *a: _jnp_fwd(*a, causal, chunk_size), q, k, v, mask)  # its checks first
    branch = lambda backend, interpret: _fwd_branch(backend, interpret, causal, chunk_size)
    jnp_form = lambda q, k, v, mask: _jnp_fwd(q, k, v, mask, causal, chunk_size)
    out, m, l = _choose((q, k, v, mask), branch, jnp_form)
    m, l = lax.stop_gradient(m), lax.stop_gradient(l)
    return out, {"q": q, "k": k, "v": v, "o": out, "m": m, "l": l}


def attend_backward(res, dout, mask=None, *, causal=False, chunk_size=None):
    """``(dq, dk, dv)`` from :func:`attend`'s residuals (the hand-derived backward of whichever
    form the platform runs)."""
    if not hasattr(dout, "shape") or dout.shape != res["o"].shape:
        raise ValueError(f"MultiHeadAttention: attention's dout shape "
                         f"{getattr(dout, 'shape', dout)} differs from its output shape "
                         f"{res['o'].shape}")
    branch = lambda backend, interpret: _bwd_branch(backend, interpret, causal, chunk_size)
    jnp_form = lambda q, k, v, o, m, l, do, mask: _jnp_bwd(q, k, v, o, m, l, do, mask, causal,
                                                           chunk_size)
    args = tuple(res[n] for n in ("q", "k", "v", "o", "m", "l")) + (dout, mask)
    return _choose(args, branch, jnp_form)
