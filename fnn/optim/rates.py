"""The learning rate as optimizer state: read it and change it between compiled steps.

``scale_by_learning_rate`` keeps the rate in its state (as ``optax.inject_hyperparams`` does), so
it is an *input* of a compiled train step, not a constant baked into it: a reduce-on-plateau
rule changes it between epochs without a recompile, and optimizers built from the same
arguments (``sgd(0.01)`` twice) run the same program::

    opt = fnn.optim.adam(1e-3)
    opt_state = opt.init(params)
    fnn.optim.learning_rate(opt_state)                   # Array(0.001)
    opt_state = fnn.optim.set_learning_rate(opt_state, 1e-4)

:func:`learning_rate` and :func:`set_learning_rate` also read and change the ``learning_rate``
hyperparameter of an ``optax.inject_hyperparams`` state.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn.optim.base import GradientTransformation, safe_increment

PyTree = Any

__all__ = ["LearningRateState", "ScheduledLearningRateState", "scale_by_learning_rate",
           "learning_rate", "set_learning_rate", "rate_nodes", "check_rate"]


class LearningRateState(NamedTuple):
    """A constant rate :math:`\\eta`, a float scalar array read by every update."""

    learning_rate: jax.Array


class ScheduledLearningRateState(NamedTuple):
    """A scheduled rate: ``count`` (int32, updates so far) and ``learning_rate``, the rate of
    the last update (:math:`\\eta(0)` before the first)."""

    count: jax.Array
    learning_rate: jax.Array


def check_rate(name: str, value, what: str = "learning_rate"):
    """Raise ``ValueError`` unless ``value`` is a finite real number ``>= 0``; return it.

    Example: ``check_rate("adam", -1e-3)`` raises ``adam: learning_rate must be a finite
    number >= 0, got -0.001``.
    """
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        if isinstance(value, jax.core.Tracer):
            return value                        # traced: checked where it was concrete
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: {what} must be a number or a schedule step -> value, "
                        f"got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: {what} must be a finite number >= 0, got {value}")
    return value


def _float_dtype():
    return jax.dtypes.canonicalize_dtype(np.float64)   # float64 with jax_enable_x64, else f32


def scale_by_learning_rate(learning_rate, *, flip_sign: bool = True,
                           name: str = "scale_by_learning_rate") -> GradientTransformation:
    """Scale by :math:`-\\eta` (a float) or :math:`-\\eta(t)` (a schedule ``step -> value``).

    The sign flip turns a descent direction into a step: ``params + updates`` descends. The
    rate lives in the state (:class:`LearningRateState`, or :class:`ScheduledLearningRateState`
    for a schedule), so the update function does not depend on its value. A negative or
    non-finite rate raises ``ValueError`` naming ``name`` (the optimizer).
    """
    m = -1 if flip_sign else 1
    if callable(learning_rate):
        def init_scheduled(params):
            return ScheduledLearningRateState(jnp.zeros([], jnp.int32), jnp.asarray(
                learning_rate(0), _float_dtype()))

        def update_scheduled(updates, state, params=None):
            rate = learning_rate(state.count)
            updates = jax.tree.map(lambda g: jnp.array(m * rate, dtype=g.dtype) * g, updates)
            return updates, ScheduledLearningRateState(safe_increment(state.count),
                                                        jnp.asarray(rate, _float_dtype()))
        return GradientTransformation(init_scheduled, update_scheduled)
    rate = check_rate(name, learning_rate)

    def init(params):
        return LearningRateState(jnp.asarray(rate, _float_dtype()))

    def update(updates, state, params=None):
        s = m * state.learning_rate
        return jax.tree.map(lambda g: s.astype(g.dtype) * g, updates), state
    return GradientTransformation(init, update)


def _is_rate_node(node) -> bool:
    return isinstance(node, (LearningRateState, ScheduledLearningRateState)) or (
        isinstance(getattr(node, "hyperparams", None), dict)
        and "learning_rate" in node.hyperparams)


def rate_nodes(opt_state: PyTree) -> list:
    """The nodes of ``opt_state`` that hold a learning rate, in tree order: fnn's
    :class:`LearningRateState` / :class:`ScheduledLearningRateState` and
    ``optax.inject_hyperparams`` states (``[]`` for a plain optax optimizer). Works on traced
    states too (``fit`` reads the rate inside its compiled epoch)."""
    return [n for n in jax.tree.leaves(opt_state, is_leaf=_is_rate_node) if _is_rate_node(n)]


def learning_rate(opt_state: PyTree) -> jax.Array:
    """The current learning rate held in ``opt_state`` (the first one, in tree order).

    Reads fnn optimizers' :class:`LearningRateState` / :class:`ScheduledLearningRateState`
    (for a schedule: the rate of the last update) and ``optax.inject_hyperparams`` states.
    Raises ``ValueError`` when the state holds none (a plain optax optimizer).

    Example::

        lr = float(fnn.optim.learning_rate(opt_state))
    """
    nodes = rate_nodes(opt_state)
    if not nodes:
        raise ValueError("learning_rate: this optimizer state holds no learning rate (fnn's "
                         "optimizers and optax.inject_hyperparams states do)")
    node = nodes[0]
    return node.learning_rate if hasattr(node, "learning_rate") else \
        jnp.asarray(node.hyperparams["learning_rate"])


def set_learning_rate(opt_state: PyTree, value) -> PyTree:
    """``opt_state`` with every learning rate in it set to ``value`` (dtype kept, so a jitted
    step that takes the state does not recompile).

    Works on fnn's :class:`LearningRateState` and ``optax.inject_hyperparams`` states. Raises
    ``ValueError`` for a negative or non-finite ``value``, for a scheduled rate (the schedule
    owns it) and for a state without a learning rate.

    Example::

        opt_state = fnn.optim.set_learning_rate(opt_state, 0.1 * float(learning_rate(opt_state)))
    """
    value = check_rate("set_learning_rate", value, "value")
    if not rate_nodes(opt_state):
        raise ValueError("set_learning_rate: this optimizer state holds no learning rate "
                         "(fnn's optimizers and optax.inject_hyperparams states do)")

    def put(node):
        if isinstance(node, ScheduledLearningRateState):
            raise ValueError("set_learning_rate: this learning rate comes from a schedule; "
                             "build the optimizer with a constant rate to change it by hand")
        if isinstance(node, LearningRateState):
            return LearningRateState(jnp.asarray(value, node.learning_rate.dtype))
        if _is_rate_node(node):
            old = jnp.asarray(node.hyperparams["learning_rate"])
            return node._replace(hyperparams={**node.hyperparams,
                                              "learning_rate": jnp.asarray(value, old.dtype)})
        return node
    return jax.tree.map(put, opt_state, is_leaf=_is_rate_node)
