"""Loss scaling for float16, whose gradients underflow below ~6e-8.

:class:`LossScale` is a pytree ``(scale, good_steps)`` with PyTorch GradScaler's dynamic rule.
:func:`loss_scaling` wraps an optimizer so that the scale lives in the optimizer state: its
``update`` unscales the gradients, skips a non-finite step (zero update, inner state kept) and
moves the scale; the train step differentiates ``scale · loss`` (:func:`current_scale` reads
it). ``fit(precision="float16")`` does all this inside the compiled epoch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnn.optim.base import GradientTransformation

__all__ = ["LossScale", "loss_scale", "scale_loss", "unscale", "update_scale", "all_finite",
           "LossScalingState", "loss_scaling", "current_scale", "ScaledLoss"]


# --------------------------------------------------------------------------- loss scaling

class LossScale(NamedTuple):
    """Loss-scaling state: ``scale`` (float32 scalar) and ``good_steps`` (int32: finite steps
    since the scale last changed). ``dynamic`` is static (part of the tree's structure)."""

    scale: jax.Array
    good_steps: jax.Array


def loss_scale(initial: float = 2.0 ** 15) -> LossScale:
    """A fresh loss scale (PyTorch GradScaler's default start, ``2^15``)."""
    if not initial > 0:
        raise ValueError(f"loss_scale: the initial scale must be positive, got {initial!r}")
    return LossScale(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32))


def scale_loss(value, ls: LossScale):
    """``value · scale``: what to differentiate so small gradients survive float16."""
    return value * ls.scale.astype(value.dtype)


def unscale(grads, ls: LossScale):
    """Gradients of the scaled loss divided by the scale, computed in float32 at least."""
    inv = 1.0 / ls.scale
    return jax.tree.map(lambda g: (g.astype(jnp.promote_types(g.dtype, jnp.float32)) * inv
                                   ).astype(g.dtype), grads)


def all_finite(tree) -> jax.Array:
    """True when every entry of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def update_scale(ls: LossScale, finite, *, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5) -> LossScale:
    """PyTorch GradScaler's rule: a non-finite step multiplies the scale by ``backoff_factor``
    (and the caller skips that step); ``growth_interval`` finite steps in a row multiply it by
    ``growth_factor``.
    """
    good = jnp.where(finite, ls.good_steps + 1, 0)
    grow = good >= growth_interval
    scale = jnp.where(finite, jnp.where(grow, ls.scale * growth_factor, ls.scale),
                      ls.scale * backoff_factor)
    return LossScale(scale.astype(jnp.float32), jnp.where(grow, 0, good).astype(jnp.int32))


# --------------------------------------------------------------------------- in an optimizer

class LossScalingState(NamedTuple):
    """The wrapped optimizer's state and the :class:`LossScale`."""

    inner: Any
    loss_scale: LossScale


def loss_scaling(optimizer, *, initial: float = 2.0 ** 15, dynamic: bool = True,
                 growth_interval: int = 2000) -> GradientTransformation:
    """``optimizer`` taking gradients of ``scale · loss``: ``update`` divides them by the scale
    (in float32), applies ``optimizer`` when all are finite and otherwise returns zero updates
    with the inner state unchanged (the step is skipped); a dynamic scale then follows
    :func:`update_scale`, a static one (``dynamic=False``) stays at ``initial``.
    """
    if growth_interval < 1:
        raise ValueError(f"loss_scaling: growth_interval must be >= 1, got {growth_interval}")

    def init(params):
        return LossScalingState(optimizer.init(params), loss_scale(initial))

    def update(grads, state, params=None):
        ls = state.loss_scale
        grads = unscale(grads, ls)
        ok = all_finite(grads)
        safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
        updates, inner = optimizer.update(safe, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        inner = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner, state.inner)
        ls = update_scale(ls, ok, growth_interval=growth_interval) if dynamic else ls
        return updates, LossScalingState(inner, ls)

    return GradientTransformation(init, update)


def current_scale(opt_state):
    """The :class:`LossScale` inside ``opt_state`` (found at trace time), or ``None``."""
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, LossScale))
             if isinstance(n, LossScale)]
    return found[0] if found else None


class ScaledLoss(NamedTuple):
    """``loss`` whose hand-derived ``grad`` is multiplied by ``scale`` (its value is not): the
    output error of a loss-scaled hand backward, scaled in float32 before the model casts it
    down."""

    loss: Any
    scale: jax.Array

    def __call__(self, pred, target, **kw):
        return self.loss(pred, target, **kw)

    def grad(self, pred, target, **kw):
        g = self.loss.grad(pred, target, **kw)
        return g * self.scale.astype(g.dtype)
