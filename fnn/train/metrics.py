"""Metrics computed inside the compiled epoch: sums carried from step to step, one number per
epoch at the end.

A :class:`Metric` is a pair of pure functions: ``stats(pred, target, weights) -> pytree`` (this
batch's sums; ``weights [batch]`` is 1 for a real example, 0 for padding) and
``result(total) -> scalar`` (from the sums over the epoch). Summing is exact over any split of
the epoch into batches, so a macro F1 is the epoch's, not a mean of per-batch F1s::

    fit(...)                                  # metrics="auto": accuracy for a classifier
    fit(..., metrics=["accuracy", "top3_accuracy", "macro_f1"])
    fit(..., metrics=[mean_absolute_error, my_per_example_fn])
    fit(..., metrics=())                      # none

Per-example functions ``fn(pred, target) -> [batch]`` (``categorical_accuracy``, your own)
become mean metrics named after the function.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, NamedTuple

import jax.numpy as jnp

from fnn.core import default_dtype

__all__ = ["Metric", "categorical_accuracy", "binary_accuracy", "top_k_accuracy",
           "mean_absolute_error", "macro_f1", "mean_metric", "accuracy_fn", "resolve_metrics"]


class Metric(NamedTuple):
    """``name`` (the history key), ``stats(pred, target, weights) -> sums``,
    ``result(sums) -> scalar``."""

    name: str
    stats: Callable
    result: Callable


def categorical_accuracy(pred, target):
    """Per-example accuracy ``[batch]``: ``argmax(pred, -1) == label`` averaged over any axes
    between batch and classes. ``pred: [batch, ..., classes]``; ``target``: integer labels
    ``[batch, ...]`` or one-hot ``[batch, ..., classes]``."""
    labels = target if target.ndim == pred.ndim - 1 else jnp.argmax(target, axis=-1)
    hit = (jnp.argmax(pred, axis=-1) == labels).astype(default_dtype())
    return jnp.mean(hit.reshape(hit.shape[0], -1), axis=1)


@functools.lru_cache(maxsize=None)
def binary_accuracy(threshold: float = 0.5) -> Callable:
    """Per-example accuracy ``[batch]`` of ``pred > threshold`` against ``target > 0.5``
    (``threshold=0`` for logits, ``0.5`` for probabilities)."""
    def accuracy(pred, target):
        hit = ((pred > threshold) == (target > 0.5)).astype(default_dtype())
        return jnp.mean(hit.reshape(hit.shape[0], -1), axis=1)
    return accuracy


@functools.lru_cache(maxsize=None)
def top_k_accuracy(k: int) -> Callable:
    """Per-example top-``k`` accuracy ``[batch]``: the label is among the ``k`` largest
    logits. ``pred: [batch, classes]``, ``target``: integer labels ``[batch]`` (or one-hot)."""
    def accuracy(pred, target):
        labels = target if target.ndim == pred.ndim - 1 else jnp.argmax(target, axis=-1)
        own = jnp.take_along_axis(pred, labels[..., None].astype(jnp.int32), axis=-1)
        rank = jnp.sum(pred > own, axis=-1)              # classes strictly ahead of the label
        hit = (rank < k).astype(default_dtype())
        return jnp.mean(hit.reshape(hit.shape[0], -1), axis=1)
    accuracy.__name__ = f"top{k}_accuracy"
    return accuracy


def mean_absolute_error(pred, target):
    """Per-example ``mean |pred - target|`` over the non-batch axes, ``[batch]``."""
    d = jnp.abs(pred - target.astype(pred.dtype))
    return jnp.mean(d.reshape(d.shape[0], -1), axis=1)


@functools.lru_cache(maxsize=256)
def mean_metric(name: str, fn: Callable) -> Metric:
    """The example-weighted mean of a per-example function ``fn(pred, target) -> [batch]``."""
    def stats(pred, target, w):
        return jnp.sum(fn(pred, target) * w), jnp.sum(w)
    return Metric(name, stats, lambda s: s[0] / s[1])


def _f1_stats(pred, target, w):
    c = pred.shape[-1]
    labels = target if target.ndim == pred.ndim - 1 else jnp.argmax(target, axis=-1)
    guess = jnp.argmax(pred, axis=-1).reshape(-1)
    labels, w = labels.reshape(-1), jnp.broadcast_to(
        w.reshape((-1,) + (1,) * (labels.ndim - 1)), labels.shape).reshape(-1)
    one = lambda v: (v[:, None] == jnp.arange(c)[None, :]).astype(w.dtype) * w[:, None]
    p, t = one(guess), one(labels)
    return jnp.sum(p * t, 0), jnp.sum(p, 0), jnp.sum(t, 0)        # tp, predicted, actual


def _f1_result(s):
    tp, predicted, actual = s
    denom = predicted + actual                          # 2tp + fp + fn
    seen = denom > 0                                    # classes in the labels or predictions
    f1 = jnp.where(seen, 2 * tp / jnp.where(seen, denom, 1), 0.0)
    return jnp.sum(f1) / jnp.maximum(jnp.sum(seen), 1)


#: Macro F1: the unweighted mean over classes of ``2tp / (2tp + fp + fn)``, over the classes
#: present in the labels or the predictions (as scikit-learn's ``f1_score(average="macro")``),
#: from counts summed over the whole epoch.
macro_f1 = Metric("macro_f1", _f1_stats, _f1_result)


def _named(name: str, loss) -> Metric:
    if name in ("accuracy", "acc"):
        fn = _auto_accuracy(loss)
        if fn is None:
            raise ValueError(f"fit: metric 'accuracy' needs a classification loss (softmax or "
                             f"binary cross-entropy), got {getattr(loss, 'name', loss)!r}")
        return mean_metric("accuracy", fn)
    top = re.fullmatch(r"top_?(\d+)_accuracy", name)
    if top:
        return mean_metric(f"top{top.group(1)}_accuracy", top_k_accuracy(int(top.group(1))))
    if name in ("mae", "mean_absolute_error"):
        return mean_metric("mean_absolute_error", mean_absolute_error)
    if name in ("f1", "macro_f1"):
        return macro_f1
    raise ValueError(f"fit: unknown metric {name!r}; known: 'accuracy', 'top<k>_accuracy', "
                     f"'mean_absolute_error' ('mae'), 'macro_f1', a Metric or a function "
                     f"(pred, target) -> [batch]")


def _auto_accuracy(loss):
    """Categorical for softmax losses, binary for the two BCE losses, else ``None``."""
    name = getattr(loss, "name", "")
    if "softmax" in name:
        return categorical_accuracy
    if name in ("sigmoid_binary_cross_entropy", "binary_cross_entropy"):
        return binary_accuracy(0.0 if name.startswith("sigmoid") else 0.5)
    return None


def accuracy_fn(loss, accuracy="auto"):
    """The per-example accuracy function ``accuracy`` names for ``loss``: ``"auto"`` gives
    categorical for softmax losses, binary for the two BCE losses, else ``None``; ``None``
    gives ``None``; a function is returned as is."""
    if not (isinstance(accuracy, str) and accuracy == "auto"):
        return accuracy or None
    return _auto_accuracy(loss)


def resolve_metrics(loss, metrics="auto") -> tuple:
    """The tuple of :class:`Metric` s a run computes. ``"auto"``: accuracy (as
    ``"accuracy"``) for a classification loss (softmax or binary cross-entropy), nothing
    otherwise; else a sequence of names (``"accuracy"``, ``"top<k>_accuracy"``,
    ``"mean_absolute_error"``/``"mae"``, ``"macro_f1"``/``"f1"``), per-example functions
    ``fn(pred, target) -> [batch]`` (named after the function) and :class:`Metric` s;
    duplicate names are kept once. ``()``: none."""
    if isinstance(metrics, str):
        if metrics != "auto":
            raise ValueError(f"fit: metrics must be 'auto' or a sequence of metrics, got "
                             f"{metrics!r} (a single name goes in a list: [{metrics!r}])")
        acc = accuracy_fn(loss, "auto")
        return (mean_metric("accuracy", acc),) if acc is not None else ()
    out = []
    for m in metrics or ():
        if isinstance(m, str):
            m = _named(m, loss)
        elif not isinstance(m, Metric):
            if not callable(m):
                raise TypeError(f"fit: a metric is a name, a Metric or a function "
                                f"(pred, target) -> [batch], got {type(m).__name__}")
            m = mean_metric(getattr(m, "__name__", "metric"), m)
        if m.name not in [o.name for o in out]:
            out.append(m)
    return tuple(out)
