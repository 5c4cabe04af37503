"""Gradient clipping transforms and gradient-norm monitoring.

Clipping by norm rescales, so it keeps the direction of the update and caps its norm exactly:
:math:`u \\leftarrow u \\cdot \\min(1, c / \\lVert u \\rVert)`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnn.optim.base import GradientTransformation, PyTree, init_empty

__all__ = ["global_norm", "leaf_norms", "GradNorms", "grad_norms", "clip_by_global_norm",
           "clip_by_value", "clip_by_leaf_norm"]


def global_norm(tree: PyTree) -> jax.Array:
    """The Euclidean norm of all leaves together: :math:`\\sqrt{\\sum_\\ell \\lVert x_\\ell \\rVert^2}`."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def leaf_norms(tree: PyTree) -> PyTree:
    """The Euclidean norm of each leaf, a tree of scalars shaped like ``tree``."""
    return jax.tree.map(lambda x: jnp.sqrt(jnp.sum(jnp.square(x))), tree)


class GradNorms(NamedTuple):
    """``global_norm``: a scalar; ``leaf_norms``: a scalar per leaf, shaped like the grads."""

    global_norm: jax.Array
    leaf_norms: PyTree


def grad_norms(grads: PyTree) -> GradNorms:
    """Global and per-leaf gradient norms, for watching for vanishing or exploding gradients.

    Log them every few steps: a global norm that keeps shrinking towards 0 (or leaves of the
    first layers far below the last ones) signals vanishing gradients; one that grows by
    orders of magnitude, or turns ``inf``/``nan``, signals exploding ones (clip, lower the
    learning rate, or normalise).

    Example::

        norms = grad_norms(grads)
        print(float(norms.global_norm), jax.tree.map(float, norms.leaf_norms))
    """
    per_leaf = leaf_norms(grads)
    total = jnp.sqrt(sum(jnp.square(n) for n in jax.tree.leaves(per_leaf)))
    return GradNorms(global_norm=total, leaf_norms=per_leaf)


def _rescale(u, norm, max_norm):
    """``u`` if ``norm < max_norm``, else ``u / norm * max_norm`` (norm exactly ``max_norm``)."""
    return jnp.where(norm < max_norm, u, (u / norm.astype(u.dtype)) * max_norm)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale all updates together so that their global norm is at most ``max_norm``.

    :math:`u \\leftarrow u \\cdot \\min(1, c / \\lVert u \\rVert_{global})` (Pascanu et al., 2013).

    Example::

        opt = chain(clip_by_global_norm(1.0), adam(1e-3))
    """
    def update(updates, state, params=None):
        norm = global_norm(updates)
        return jax.tree.map(lambda u: _rescale(u, norm, max_norm), updates), state

    return GradientTransformation(init_empty, update)


def clip_by_leaf_norm(max_norm: float) -> GradientTransformation:
    """Rescale each leaf on its own so that its norm is at most ``max_norm``.

    :math:`u_\\ell \\leftarrow u_\\ell \\cdot \\min(1, c / \\lVert u_\\ell \\rVert)` per leaf.
    """
    def one(u):
        return _rescale(u, jnp.sqrt(jnp.sum(jnp.square(u))), max_norm)

    def update(updates, state, params=None):
        return jax.tree.map(one, updates), state

    return GradientTransformation(init_empty, update)


def clip_by_value(limit: float) -> GradientTransformation:
    """Clip every element to :math:`[-c, c]` (changes the direction, unlike norm clipping).

    Example: ``opt = chain(clip_by_value(5.0), sgd(0.1))``.
    """
    def update(updates, state, params=None):
        return jax.tree.map(lambda u: jnp.clip(u, -limit, limit), updates), state

    return GradientTransformation(init_empty, update)
