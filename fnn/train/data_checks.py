"""Data checks for ``fit`` (not validation, which is ``val_data``): in-memory data once, each
streamed host batch as it arrives.

:func:`make_data_check` builds the one check ``fit`` runs on its data: every float array finite
(:func:`_check_finite`: a NaN in the data is a data problem, and the error says so instead of a
"non-finite loss" later), then integer labels within the model's classes and token ids within
the vocabularies of the ``Embedding`` layers reading the input (:func:`fnn.checks.data_checker`).
"""
from __future__ import annotations

import numpy as np

import jax

from fnn.checks import data_checker
from fnn.train.cache import cached


def _nonfinite(a):
    """``(count, first example index)`` of the non-finite entries of a float array."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.inexact):
        return 0, None
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(a)):      # a finite sum: every value finite (one fast pass)
            return 0, None
    bad = ~np.isfinite(a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1))
    rows = np.flatnonzero(bad.any(axis=1))
    return int(bad.sum()), (int(rows[0]) if rows.size else None)


def _paths(data):
    x, t, kw = data
    named = [("x", x), ("target", t)] + [(f"model_kwargs[{k!r}]", v) for k, v in kw.items()]
    for name, tree in named:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            yield name + jax.tree_util.keystr(path), leaf


def _check_finite(data, where: str, offset: int = 0):
    """Check ``data = (x, target, model_kwargs)`` (in-memory, or one streamed host batch whose
    first example is number ``offset``) before training; raise ``ValueError`` naming the array,
    how many values are not finite and the first example holding one."""
    for name, leaf in _paths(data):
        count, first = _nonfinite(leaf)
        if count:
            raise ValueError(
                f"{where}: {name} holds {count} non-finite value(s) (NaN or Inf), the first in "
                f"example {offset + first}: the data, not the model, is at fault; clean or drop "
                f"those examples (or pass loop=Loop(check_data=False) to train anyway)")


@cached
def make_data_check(model, loss, input_shape):
    """``check(data, where, offset=0)`` for ``data = (x, target, model_kwargs)``: finiteness,
    then label and token-id ranges; raises ``ValueError`` naming the array or the loss/layer.
    Memoised per model, loss and input shape (:func:`fnn.train.cache.cached`): building it
    traces ``model.init`` abstractly, a fixed cost each ``fit`` call would pay again."""
    values = data_checker(model, loss, input_shape)

    def check(data, where, offset=0):
        _check_finite(data, where, offset)
        values(data[0], data[1], where)
    return check


def inputs_finite(data) -> bool:
    """Whether every float array of one batch ``(x, target, model_kwargs)`` is finite."""
    return not any(_nonfinite(leaf)[0] for _, leaf in _paths(data))
