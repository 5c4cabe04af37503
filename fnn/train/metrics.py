"""Accuracy metrics: per-example functions ``(pred, target) -> [batch]``."""
from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp

from fnn.core import default_dtype

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


def _accuracy_fn(loss, accuracy):
    """``"auto"``: categorical for softmax losses, binary for the two BCE losses, else none."""
    if not (isinstance(accuracy, str) and accuracy == "auto"):
        return accuracy or None
    name = getattr(loss, "name", "")
    if "softmax" in name:
        return categorical_accuracy
    if name in ("sigmoid_binary_cross_entropy", "binary_cross_entropy"):
        return binary_accuracy(0.0 if name.startswith("sigmoid") else 0.5)
    return None

