"""Unroll a function's loops for cost analysis: every ``lax.scan``, and every ``while_loop``
(``fori_loop``) whose trip count is known at trace time, become straight-line code.

XLA's ``cost_analysis()`` counts a while-loop body once, whatever its trip count, so the FLOPs
and bytes of a ``stack`` of blocks (one ``lax.scan``), of chunked attention (scans over blocks, a
``fori_loop`` per key block) or of a recurrent layer (a scan over time) read as one iteration's.
:func:`unrolled` re-traces ``fn``'s jaxpr with each loop written out, iteration by iteration:

- ``scan``: its body once per step, on the step's slice of ``xs``; outputs stacked.
- ``while``: its condition is evaluated on the carry; while that is a known value (a
  ``fori_loop`` whose bounds come from constants and loop indices), the body is written out and
  the loop continues; from the first unknown condition (or after ``max_steps`` steps) the rest
  runs as a real while loop.
- ``cond`` with a known index: only the branch taken (``lax.cond`` skipping a causal block).
- nested ``jit``, ``custom_jvp``/``custom_vjp`` calls: inlined (their primal); ``checkpoint``:
  inlined behind an ``optimization_barrier`` on its inputs, as JAX lowers it, so XLA does not
  merge the recomputation with the forward.

Values known at trace time are small index computations (``iota``, loop counters, their
arithmetic), evaluated eagerly when every input is known, the primitive has no effects and the
result has at most ``KNOWN_LIMIT`` elements; everything else is traced as in ``fn``. The result
computes what ``fn`` computes (tested against it) with the same primitives. A ``platform_index``
(``lax.platform_dependent``) is never evaluated here: the lowering platform decides it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

__all__ = ["unrolled", "KNOWN_LIMIT"]

KNOWN_LIMIT = 4096          # elements: larger known results are traced (not baked in as literals)
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
_NEVER_KNOWN = {"platform_index", "rng_bit_generator", "rng_uniform", "random_seed",
                "random_bits", "random_wrap", "random_unwrap", "random_fold_in", "random_split"}


def unrolled(fn, *, max_steps: int = 10_000):
    """``fn`` with its loops written out (see the module doc): same arguments, same results.
    ``max_steps`` caps the iterations written out per loop: a longer scan stays a scan, a
    while loop runs its remaining iterations as a loop."""
    def run(*args, **kwargs):
        closed, out_tree = jax.make_jaxpr(fn, return_shape=True)(*args, **kwargs)
        flat = jax.tree.leaves((args, kwargs))
        out = _eval(closed.jaxpr, closed.consts, flat, max_steps)
        return jax.tree.unflatten(jax.tree.structure(out_tree), out)
    return run


def _known(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _size(aval) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _eval(jaxpr, consts, args, max_steps):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        outs = _eqn(eqn, [read(v) for v in eqn.invars], max_steps)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _closed(closed, args, max_steps):
    return _eval(closed.jaxpr, closed.consts, args, max_steps)


def _eqn(eqn, invals, max_steps):
    name, params = eqn.primitive.name, eqn.params
    if name == "scan" and params["length"] <= max_steps:
        return _scan(params, invals, max_steps)
    if name == "while":
        return _while(eqn, invals, max_steps)
    if name == "cond" and _known(invals[0]):
        index = min(max(int(np.asarray(invals[0])), 0), len(params["branches"]) - 1)
        return _closed(params["branches"][index], invals[1:], max_steps)
    if name in _CALLS and _CALLS[name] in params:
        inner = params[_CALLS[name]]
        if name in ("remat", "checkpoint"):          # an open jaxpr; keep JAX's CSE barrier
            if params.get("prevent_cse", True):
                invals = list(jax.lax.optimization_barrier(list(invals)))
            return _eval(inner, (), invals, max_steps)
        if isinstance(inner, jcore.ClosedJaxpr):
            return _closed(inner, invals, max_steps)
    return _bind(eqn, invals)


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    known = (all(_known(x) for x in invals) and not eqn.effects and not _has_jaxpr(params)
             and eqn.primitive.name not in _NEVER_KNOWN
             and all(_size(v.aval) <= KNOWN_LIMIT for v in eqn.outvars))
    with eqn.ctx.manager:
        if known:
            with jax.ensure_compile_time_eval():
                out = eqn.primitive.bind(*invals, **params)
        else:
            out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _has_jaxpr(params) -> bool:
    kinds = (jcore.Jaxpr, jcore.ClosedJaxpr)
    return any(isinstance(v, kinds) or (isinstance(v, tuple) and any(isinstance(a, kinds)
                                                                     for a in v))
               for v in params.values())


def _scan(params, invals, max_steps):
    nc, nk, n = params["num_consts"], params["num_carry"], params["length"]
    consts, carry, xs = invals[:nc], list(invals[nc:nc + nk]), invals[nc + nk:]
    body = params["jaxpr"]
    ys = [None] * n
    for i in (reversed(range(n)) if params["reverse"] else range(n)):
        out = _closed(body, [*consts, *carry, *(_slice(x, i) for x in xs)], max_steps)
        carry, ys[i] = out[:nk], out[nk:]
    y_avals = body.out_avals[nk:]
    stacked = [jnp.stack([y[j] for y in ys]) if n else jnp.zeros((0, *a.shape), a.dtype)
               for j, a in enumerate(y_avals)]
    return [*carry, *stacked]


def _slice(x, i):
    if _known(x):
        with jax.ensure_compile_time_eval():
            return x[i]
    return x[i]


def _while(eqn, invals, max_steps):
    params = eqn.params
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    cconsts, bconsts, carry = invals[:cn], invals[cn:cn + bn], list(invals[cn + bn:])
    for _ in range(max_steps):
        (pred,) = _closed(params["cond_jaxpr"], [*cconsts, *carry], max_steps)
        if not _known(pred):
            break
        if not bool(np.asarray(pred)):
            return carry
        carry = _closed(params["body_jaxpr"], [*bconsts, *carry], max_steps)
    return _bind(eqn, [*cconsts, *bconsts, *carry])            # the rest as a real loop
