"""Loss functions, each with its hand-derived gradient with respect to the prediction.

Every loss is a :class:`Loss`, called as ``loss(pred, target, weights=None, reduction="mean")``
and differentiated by hand as ``loss.grad(pred, target, weights=None, reduction="mean")``, which
returns ``∂loss/∂pred`` with the shape of ``pred``.

Shapes. Regression and binary losses are elementwise: ``pred`` and ``target`` have the same
shape, and ``reduction="none"`` returns that shape. Categorical losses take logits
``[..., classes]`` and one-hot targets of the same shape, or integer labels of shape ``[...]``;
``reduction="none"`` returns shape ``[...]``. Mismatched shapes raise ``ValueError`` — never a
silent broadcast.

Reductions: ``"mean"`` is the (weighted) mean over all unreduced values, ``sum(w·l) / sum(w)``
with ``w`` broadcast to the unreduced shape, so zero weights mask entries out of the mean;
``"sum"`` is ``sum(w·l)``; ``"none"`` is ``w·l``. ``weights`` has the unreduced shape or a
prefix of it (``(batch,)`` for per-example weights).

>>> logits, labels = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), jnp.array([0, 2])
>>> print(softmax_cross_entropy_with_integer_labels(logits, labels).round(4))
0.6691
>>> print(softmax_cross_entropy_with_integer_labels.grad(logits, labels).round(4))  # (softmax - onehot) / n
[[-0.1065  0.0533  0.0533]
 [ 0.1667  0.1667 -0.3333]]
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fnn.activations import log_softmax, sigmoid, softmax
from fnn.checks import check_range

__all__ = [
    "Loss", "mse", "mae", "huber", "binary_cross_entropy", "sigmoid_binary_cross_entropy",
    "categorical_cross_entropy", "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels", "sparse_categorical_cross_entropy",
]

_REDUCTIONS = ("mean", "sum", "none")


class Loss(NamedTuple):
    """A loss with its hand-derived gradient.

    ``value(pred, target)`` gives the unreduced loss; ``dvalue(pred, target, c)`` gives
    ``Σ c·∂value/∂pred`` for a coefficient ``c`` of the unreduced shape (the weights and the
    reduction folded together). ``reduces_last``: the loss sums over the last (class) axis.
    ``integer_labels``: ``target`` is integer class labels in ``[0, pred.shape[-1])``
    (read by :func:`fnn.checks.check_data`).
    """

    value: Callable
    dvalue: Callable
    name: str
    check: Callable
    reduces_last: bool = False
    integer_labels: bool = False

    def __call__(self, pred, target, weights=None, reduction="mean"):
        pred, target = self.check(pred, target)
        _check_reduction(self.name, reduction)
        l = self.value(pred, target)
        w = _weights(self.name, weights, l.shape, l.dtype)
        if reduction == "none":
            return l if w is None else w * l
        if reduction == "sum":
            return jnp.sum(l if w is None else w * l)
        return jnp.mean(l) if w is None else jnp.sum(w * l) / jnp.sum(w)

    def grad(self, pred, target, weights=None, reduction="mean"):
        """``∂ loss(pred, target, weights, reduction) / ∂pred``, derived by hand
        (``reduction="none"`` gives the gradient of the sum: each entry's own derivative)."""
        pred, target = self.check(pred, target)
        _check_reduction(self.name, reduction)
        shape = pred.shape[:-1] if self.reduces_last else pred.shape
        w = _weights(self.name, weights, shape, pred.dtype)
        c = jnp.ones(shape, pred.dtype) if w is None else w
        if reduction == "mean":
            c = c / (c.size if w is None else jnp.sum(w))
        return self.dvalue(pred, target, c)


def _check_reduction(name, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _weights(name, weights, shape, dtype):
    if weights is None:
        return None
    weights = jnp.asarray(weights, dtype)
    if weights.shape != tuple(shape[: weights.ndim]):
        raise ValueError(f"{name}: weights of shape {weights.shape} do not fit the unreduced "
                         f"loss of shape {tuple(shape)} (need that shape or a prefix of it)")
    return jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (len(shape) - weights.ndim)),
                            shape)


def _as_array(name, what, a):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        if isinstance(a, (list, tuple, int, float)):
            return jnp.asarray(a)
        raise TypeError(f"{name}: {what} must be an array, got {type(a).__name__}")
    return jnp.asarray(a)


def _same_shape(name):
    def check(pred, target):
        pred, target = _as_array(name, "pred", pred), _as_array(name, "target", target)
        if pred.shape != target.shape:
            raise ValueError(f"{name}: pred shape {pred.shape} and target shape {target.shape} "
                             f"differ (no broadcasting)")
        if not jnp.issubdtype(pred.dtype, jnp.floating):
            raise TypeError(f"{name}: pred must be floating point, got {pred.dtype}")
        return pred, target.astype(pred.dtype)
    return check


def _labels(name):
    def check(logits, labels):
        logits, labels = _as_array(name, "logits", logits), _as_array(name, "labels", labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"{name}: labels must be integers, got {labels.dtype}")
        if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
            raise ValueError(f"{name}: labels of shape {labels.shape} do not fit logits of "
                             f"shape {logits.shape} (labels need shape logits.shape[:-1])")
        check_range(labels, 0, logits.shape[-1], name, "label",
                    f" (the logits have {logits.shape[-1]} classes)")
        return logits, labels
    return check


def _elementwise(value, dprime, name) -> Loss:
    """An elementwise loss ``l = value(p, t)`` with ``∂l/∂p = dprime(p, t)``."""
    return Loss(value, lambda p, t, c: c * dprime(p, t), name, _same_shape(name))


# --------------------------------------------------------------------------- regression

mse = _elementwise(lambda p, t: (p - t) ** 2, lambda p, t: 2 * (p - t), "mse")
"""Mean squared error ``(p - t)²``; ``∂/∂p = 2(p - t)``."""

mae = _elementwise(lambda p, t: jnp.abs(p - t), lambda p, t: jnp.sign(p - t), "mae")
"""Mean absolute error ``|p - t|``; ``∂/∂p = sign(p - t)`` (0 at ``p = t``)."""


def huber(delta: float = 1.0) -> Loss:
    """Huber loss: ``½r²`` for ``|r| ≤ δ``, else ``δ(|r| - ½δ)`` with ``r = p - t``;
    ``∂/∂p = clip(r, -δ, δ)``."""
    def value(p, t):
        r = jnp.abs(p - t)
        return jnp.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta))
    return _elementwise(value, lambda p, t: jnp.clip(p - t, -delta, delta), f"huber({delta})")


# --------------------------------------------------------------------------- binary

def _bce_value(p, t, eps=1e-12):
    p = jnp.clip(p, eps, 1 - eps)
    return -(t * jnp.log(p) + (1 - t) * jnp.log1p(-p))


def _bce_dvalue(p, t, eps=1e-12):
    inside = (p > eps) & (p < 1 - eps)
    p = jnp.clip(p, eps, 1 - eps)
    return jnp.where(inside, (p - t) / (p * (1 - p)), 0.0)


binary_cross_entropy = _elementwise(_bce_value, _bce_dvalue, "binary_cross_entropy")
"""Binary cross-entropy from probabilities ``-(t log p + (1-t) log(1-p))``, ``p`` clipped to
``[1e-12, 1 - 1e-12]``; ``∂/∂p = (p - t) / (p(1 - p))`` (0 where clipped). Prefer the logits
form."""


def _sbce_value(z, t):
    # -(t log σ(z) + (1-t) log(1-σ(z))) = max(z, 0) - t·z + log(1 + e^{-|z|})
    return jnp.maximum(z, 0) - t * z + jnp.log1p(jnp.exp(-jnp.abs(z)))


sigmoid_binary_cross_entropy = _elementwise(_sbce_value, lambda z, t: sigmoid(z) - t,
                                            "sigmoid_binary_cross_entropy")
"""Binary cross-entropy from logits, stable for any ``z``:
``max(z, 0) - t·z + log(1 + e^{-|z|})``; ``∂/∂z = σ(z) - t``."""


# --------------------------------------------------------------------------- categorical

def _onehot_check(name):
    same = _same_shape(name)

    def check(p, t):
        p, t = same(p, t)
        if p.ndim < 1:
            raise ValueError(f"{name}: logits need a class axis, got shape {p.shape}")
        return p, t
    return check


softmax_cross_entropy = Loss(
    lambda z, t: -jnp.sum(t * log_softmax(z), axis=-1),
    lambda z, t, c: c[..., None] * (softmax(z) * jnp.sum(t, axis=-1, keepdims=True) - t),
    "softmax_cross_entropy", _onehot_check("softmax_cross_entropy"), True)
"""Categorical cross-entropy from logits and one-hot (or soft) targets over the last axis:
``-Σ_k t_k log softmax(z)_k``; ``∂/∂z = softmax(z)·Σ_k t_k - t`` (``softmax(z) - t`` for
one-hot ``t``)."""


def _int_value(z, y):
    return -jnp.take_along_axis(log_softmax(z), y[..., None], axis=-1)[..., 0]


def _int_dvalue(z, y, c):
    onehot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
    return c[..., None] * (softmax(z) - onehot)


softmax_cross_entropy_with_integer_labels = Loss(
    _int_value, _int_dvalue, "softmax_cross_entropy_with_integer_labels",
    _labels("softmax_cross_entropy_with_integer_labels"), True, True)
"""Categorical cross-entropy from logits ``[..., classes]`` and integer labels ``[...]``:
``-log softmax(z)_y``; ``∂/∂z = softmax(z) - onehot(y)``. Labels outside ``[0, classes)``
raise ``ValueError`` on concrete arrays (and in ``fnn.checks.checked`` mode under ``jit``).
Unchecked under ``jit``: a label ``>= classes`` or ``< -classes`` gives a NaN loss, one in
``[-classes, 0)`` the loss of class ``classes + label``; the gradient's one-hot is all zeros
out of range (finite, and wrong)."""

categorical_cross_entropy = softmax_cross_entropy
sparse_categorical_cross_entropy = softmax_cross_entropy_with_integer_labels
