"""``stack``'s choice point: how ``n`` copies of a layer keep what their backward needs.

Candidates, side by side (all exact; :func:`fnn.combinators.stack` with ``remat="auto"``):

- ``"stored"`` (the default): ``fwd`` scans the copies and stacks every copy's residuals;
- ``"remat"``: ``fwd`` keeps only each copy's input, ``bwd`` reruns that copy's forward first
  (less memory traffic, more arithmetic: faster where memory bandwidth is the limit);
- ``"unrolled"``: as ``"stored"``, with the scans unrolled (``lax.scan(..., unroll=n)``): no
  loop, no dynamic slicing of the stacked parameters, longer compilation.

Each is timed as the stack's hand forward and backward at the shapes at hand.
"""
from __future__ import annotations

import contextvars

import jax
import numpy as np

from fnn.tuning.measure import Candidate, choose
from fnn.tuning._settings import enabled

__all__ = ["FORMS", "stack_form", "check_remat"]

FORMS = ("stored", "remat", "unrolled")
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("fnn_stack_form",
                                                                    default=None)


def check_remat(remat):
    """``stack``'s ``remat`` argument: ``True``, ``False`` or ``"auto"``, else ``ValueError``."""
    if remat not in (True, False, "auto"):
        raise ValueError(f"stack: remat must be True, False or 'auto', got {remat!r}")


def _leaves_key(tree):
    return [[list(np.shape(a)), str(a.dtype)] for a in jax.tree.leaves(tree)]


def stack_form(model, layer, n: int, remat, params, x, train: bool, kw: dict) -> str:
    """The form ``model`` (``stack(layer, n, remat=remat)``) uses for ``x``'s shape:
    ``remat=True``/``False``: ``"remat"``/``"stored"``; ``"auto"``: the tuner's choice on CPU,
    ``"stored"`` with the tuner off, with per-call keywords, or for a stochastic layer in
    training (its timing would need the caller's key)."""
    if remat != "auto":
        return "remat" if remat else "stored"
    forced = _FORCED.get()
    if forced is not None:
        return forced
    if not enabled() or kw or (layer.stochastic and train):
        return FORMS[0]
    shape, dtype = tuple(x.shape), x.dtype
    key = {"layer": layer.kind, "n": n, "x": list(shape), "dtype": str(np.dtype(dtype)),
           "params": _leaves_key(params), "train": bool(train)}

    def candidate(form):
        def run(params, state, x, dy):
            token = _FORCED.set(form)
            try:
                y, _, res = model.fwd(params, state, x, train=train)
                grads, dx = model.bwd(params, state, res, dy, train=train)
            finally:
                _FORCED.reset(token)
            return y, grads, dx
        return Candidate(form, run)

    dtypes = [a.dtype for a in jax.tree.leaves(params)]

    def make_args():                    # fresh parameters of the traced ones' dtypes
        p, s, _ = model.init(jax.random.PRNGKey(0), shape)
        leaves, tree = jax.tree.flatten(p)
        p = jax.tree.unflatten(tree, [np.asarray(a).astype(t) for a, t in zip(leaves, dtypes)])
        r = np.random.default_rng(0)
        return (p, s, *(r.standard_normal(shape).astype(dtype) for _ in range(2)))
    return choose("stack.form", key, [candidate(f) for f in FORMS], make_args)
