"""The optimizer protocol, composition, learning-rate scaling, weight decay and masks.

An optimizer is a pair of pure functions with optax's ``GradientTransformation`` signature::

    opt_state          = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params=None)
    params             = apply_updates(params, updates)

``GradientTransformation`` here is a NamedTuple with the same two fields as optax's, so
``optax.chain`` accepts fnn transforms and ``fnn.optim.chain`` accepts optax ones. Every state
is a NamedTuple of arrays (``count`` an int32 scalar), hence a plain pytree: it passes through
``jax.jit``, ``jax.tree.map`` and checkpoints unchanged.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Schedule = Callable[[Any], Any]  # step -> value

__all__ = [
    "GradientTransformation", "EmptyState", "identity", "chain", "apply_updates",
    "safe_increment", "check_structure", "ScaleByScheduleState", "scale", "scale_by_schedule",
    "AddDecayedWeightsState", "add_decayed_weights",
    "resolve_mask", "not_named",
]


class GradientTransformation(NamedTuple):
    """An ``(init, update)`` pair of pure functions; field-compatible with optax's.

    **Fields:**
      - ``init(params) -> state``
      - ``update(updates, state, params=None) -> (updates, state)``
    """

    init: Callable
    update: Callable


class EmptyState(NamedTuple):
    """The state of a stateless transform (an empty pytree)."""


def init_empty(params):
    """The ``init`` of a stateless transform: ``EmptyState()`` whatever the params."""
    del params
    return EmptyState()


def safe_increment(count):
    """``count + 1``, saturating at the int32 maximum instead of wrapping around."""
    top = np.iinfo(np.int32).max
    return jnp.where(count < top, count + 1, top).astype(jnp.int32)


def check_structure(name: str, grads: PyTree, other: PyTree, what: str = "params",
                    given: str = "gradient"):
    """Raise a ``TypeError`` naming both trees when ``grads`` and ``other`` differ in structure.

    Called at trace time, so it costs nothing inside ``jax.jit``.
    """
    a, b = jax.tree.structure(grads), jax.tree.structure(other)
    if a != b:
        raise TypeError(f"{name}: the {given} tree does not match the {what} tree.\n"
                        f"  {given} tree: {a}\n  {what} tree: {b}")


def identity() -> GradientTransformation:
    """The transform that leaves updates unchanged (stateless)."""
    return GradientTransformation(init_empty, lambda u, s, params=None: (u, s))


def chain(*transforms) -> GradientTransformation:
    """Compose transforms left to right; the state is the tuple of their states.

    Accepts fnn and optax transforms alike (anything with ``init`` and ``update``).

    Example::

        tx = chain(clip_by_global_norm(1.0), scale_by_adam(), scale_by_learning_rate(1e-3))
    """
    inits = tuple(t.init for t in transforms)
    steps = tuple(t.update for t in transforms)    # update holds no init: equal rules, equal fn

    def init(params):
        return tuple(f(params) for f in inits)

    def update(updates, state, params=None):
        if len(state) != len(steps):
            raise ValueError(f"chain: expected a state tuple of {len(steps)} entries, "
                             f"got {len(state)}")
        new_state = []
        for step, s in zip(steps, state):
            updates, s = step(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf, keeping each parameter's dtype.

    Example::

        updates, opt_state = opt.update(grads, opt_state, params)
        params = apply_updates(params, updates)
    """
    check_structure("apply_updates", updates, params)
    return jax.tree.map(lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
                        params, updates)


# --------------------------------------------------------------------------- scaling

class ScaleByScheduleState(NamedTuple):
    """Step counter for a schedule; ``count`` is an int32 scalar."""

    count: jax.Array


def scale(step_size: float) -> GradientTransformation:
    """Multiply every update by a fixed scalar: :math:`u \\leftarrow s\\,u` (stateless)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda g: step_size * g, updates), state

    return GradientTransformation(init_empty, update)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiply updates by ``step_size_fn(count)``, then count one step.

    :math:`u_t \\leftarrow s(t)\\,u_t` for :math:`t = 0, 1, \\dots` (cast to each leaf's dtype).
    """
    def init(params):
        return ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        s = step_size_fn(state.count)
        updates = jax.tree.map(lambda g: jnp.array(s, dtype=g.dtype) * g, updates)
        return updates, ScaleByScheduleState(count=safe_increment(state.count))

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- masks

def not_named(*names: str) -> Callable:
    """A mask predicate: ``True`` for leaves whose key path holds none of ``names``.

    ``not_named("b", "scale", "offset")`` skips biases and normalisation scales/offsets.
    """
    def predicate(path, leaf):
        keys = {getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path}
        return not keys.intersection(names)

    return predicate


def _one_argument(fn) -> bool:
    try:
        ps = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in ps if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def resolve_mask(mask, params: PyTree, name: str = "mask") -> PyTree:
    """Turn ``mask`` into a pytree of Python bools shaped like ``params``.

    ``mask`` is ``None`` (every leaf), a pytree of bools with the structure of ``params``, a
    predicate ``(key_path, leaf) -> bool`` (see ``not_named``), or, as in optax, a function
    ``params -> bool pytree``. Masks are static: the bools select code paths at trace time.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    if callable(mask) and _one_argument(mask):
        mask = mask(params)
    elif callable(mask):
        return jax.tree_util.tree_map_with_path(lambda p, x: bool(mask(p, x)), params)
    check_structure(name, params, mask, "mask", "params")
    return jax.tree.map(bool, mask)


# --------------------------------------------------------------------------- weight decay

def _decay(g, p, lam, scheduled):
    if scheduled:  # a schedule's value comes as an array: keep the leaf's dtype
        lam = jnp.asarray(lam, dtype=p.dtype)
    return g + lam * p


class AddDecayedWeightsState(NamedTuple):
    """Step counter, used only when the decay rate is a schedule."""

    count: jax.Array


def add_decayed_weights(weight_decay=0.0, mask=None) -> GradientTransformation:
    """Add decoupled weight decay: :math:`u \\leftarrow u + \\lambda\\,\\theta` on masked leaves.

    **Arguments:**
      - ``weight_decay``: :math:`\\lambda`, a float or a schedule ``step -> value``.
      - ``mask``: which leaves decay; ``None``, a bool pytree, a predicate on the key path,
        or a function ``params -> bool pytree`` (see ``resolve_mask``).

    Example::

        tx = add_decayed_weights(1e-4, mask=not_named("b", "scale"))
    """
    scheduled = callable(weight_decay)

    def init(params):
        return AddDecayedWeightsState(jnp.zeros([], jnp.int32)) if scheduled else EmptyState()

    def update(updates, state, params=None):
        if not scheduled and weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights: update needs params (pass params=...)")
        check_structure("add_decayed_weights", updates, params)
        lam = weight_decay(state.count) if scheduled else weight_decay
        keep = resolve_mask(mask, params)
        updates = jax.tree.map(lambda g, p, k: _decay(g, p, lam, scheduled) if k else g,
                               updates, params, keep)
        if scheduled:
            state = AddDecayedWeightsState(safe_increment(state.count))
        return updates, state

    return GradientTransformation(init, update)
