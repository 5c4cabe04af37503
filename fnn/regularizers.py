"""Weight penalties with hand-derived gradients, and early stopping as a pure function.

Penalties take the same masks as ``fnn.optim.add_decayed_weights``: ``None`` (every leaf), a
pytree of bools, or a predicate on the key path such as ``fnn.optim.not_named("b")``::

    l2 = fnn.regularizers.l2(1e-4, mask=fnn.optim.not_named("b"))
    loss = data_loss(params) + l2(params)
    grads = jax.tree.map(jnp.add, data_grads, l2.grad(params))

Early stopping keeps a small state pytree, so it runs inside ``jax.jit`` or ``lax.scan``::

    es = early_stopping(patience=5, min_delta=1e-4)
    s = es.init(params)
    s = es.update(s, val_loss, params)      # each epoch; s.stop turns True once patience runs out
    params = restore_best(s)
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fnn.optim.base import check_structure, resolve_mask

PyTree = Any

__all__ = ["Regularizer", "l1", "l2", "EarlyStopping", "EarlyStoppingState", "early_stopping",
           "restore_best"]


class Regularizer(NamedTuple):
    """A penalty: ``value(params) -> scalar`` and its hand-derived ``grad(params) -> tree``.

    Calling the regularizer is ``value``: ``reg(params) == reg.value(params)``.
    """

    value: Callable
    grad: Callable
    name: str = "regularizer"

    def __call__(self, params: PyTree) -> jax.Array:
        return self.value(params)


def _penalty(name, scale, mask, leaf_value, leaf_grad) -> Regularizer:
    def value(params):
        keep = resolve_mask(mask, params)
        terms = [leaf_value(p) for p, k in zip(jax.tree.leaves(params), jax.tree.leaves(keep))
                 if k]
        return scale * sum(terms) if terms else jnp.zeros(())

    def grad(params):
        keep = resolve_mask(mask, params)
        return jax.tree.map(lambda p, k: scale * leaf_grad(p) if k else jnp.zeros_like(p),
                            params, keep)

    return Regularizer(value, grad, name)


def l2(scale: float, mask=None) -> Regularizer:
    """L2 penalty (ridge): :math:`R(\\theta) = \\tfrac{\\lambda}{2}\\sum \\theta^2`, :math:`\\nabla R = \\lambda\\theta`.

    The :math:`\\tfrac12` makes the gradient equal to weight decay :math:`\\lambda\\theta` (with
    plain SGD, ``l2(lam)`` and ``add_decayed_weights(lam)`` take the same steps).
    Example: ``l2(1e-4)(params)``, ``l2(1e-4).grad(params)``.
    """
    return _penalty("l2", scale, mask, lambda p: 0.5 * jnp.sum(p * p), lambda p: p)


def l1(scale: float, mask=None) -> Regularizer:
    """L1 penalty (lasso): :math:`R(\\theta) = \\lambda\\sum |\\theta|`, :math:`\\nabla R = \\lambda\\operatorname{sign}(\\theta)`.

    At :math:`\\theta = 0` the subgradient 0 is used (as PyTorch's ``sign``; ``jax.grad`` of
    ``abs`` gives 1 there).
    Example: ``l1(1e-5)(params)``, ``l1(1e-5).grad(params)``.
    """
    return _penalty("l1", scale, mask, lambda p: jnp.sum(jnp.abs(p)), jnp.sign)


# --------------------------------------------------------------------------- early stopping

class EarlyStoppingState(NamedTuple):
    """``best_loss`` and ``best_params`` seen so far, ``best_step`` (the update at which it
    came, counting from 0), ``step`` (updates seen), ``wait`` (updates since the last
    improvement) and ``stop`` (a bool scalar: patience has run out)."""

    best_loss: jax.Array
    best_params: PyTree
    best_step: jax.Array
    step: jax.Array
    wait: jax.Array
    stop: jax.Array


class EarlyStopping(NamedTuple):
    """``init(params) -> state`` and ``update(state, loss, params) -> state``."""

    init: Callable
    update: Callable


def early_stopping(patience: int, min_delta: float = 0.0) -> EarlyStopping:
    """Stop when the monitored loss has not improved by ``min_delta`` for ``patience`` updates.

    An update improves when :math:`L < L_{best} - \\delta`; it then records ``params`` as the
    best and resets ``wait`` to 0, otherwise ``wait`` grows by one and ``stop`` becomes
    ``wait >= patience`` (as Keras' ``EarlyStopping``). Once stopped, the state is frozen, so a
    fixed-length jitted loop may keep calling ``update``. Pure and jittable.

    Example::

        es = early_stopping(patience=3)
        s = es.init(params)
        s = jax.jit(es.update)(s, val_loss, params)
    """
    if patience < 1:
        raise ValueError(f"early_stopping: patience must be at least 1, got {patience}")

    def init(params):
        zero = jnp.zeros([], jnp.int32)
        inf = jnp.full([], jnp.inf, dtype=jnp.zeros(()).dtype)
        return EarlyStoppingState(inf, params, zero, zero, zero, jnp.zeros([], bool))

    def update(state, loss, params):
        check_structure("early_stopping", params, state.best_params, "best params", "params")
        loss = jnp.asarray(loss, dtype=state.best_loss.dtype)
        better = loss < state.best_loss - min_delta
        wait = jnp.where(better, 0, state.wait + 1).astype(jnp.int32)
        new = EarlyStoppingState(
            best_loss=jnp.where(better, loss, state.best_loss),
            best_params=jax.tree.map(lambda p, b: jnp.where(better, p, b), params,
                                     state.best_params),
            best_step=jnp.where(better, state.step, state.best_step).astype(jnp.int32),
            step=state.step + 1, wait=wait, stop=wait >= patience)
        return jax.tree.map(lambda old, n: jnp.where(state.stop, old, n), state, new)

    return EarlyStopping(init, update)


def restore_best(state: EarlyStoppingState) -> PyTree:
    """The parameters of the best update seen (the ``params`` given at ``init`` if none)."""
    return state.best_params
