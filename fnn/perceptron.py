"""Rosenblatt's perceptron (1958): ``ŷ = step(w·x + b)``, learned by the perceptron rule.

The rule updates only on mistakes: for each sample in order,
``w ← w + lr·(y - ŷ)·x`` and ``b ← b + lr·(y - ŷ)``. It converges when the classes are linearly
separable and never does otherwise (XOR: Minsky and Papert, 1969). The whole fit is one jitted
``lax.scan`` over epochs of a ``lax.scan`` over samples.

>>> x = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
>>> params, mistakes = perceptron_fit(x, jnp.array([0, 0, 0, 1]), epochs=6)   # AND
>>> print(perceptron_predict(params, x), mistakes)          # converged: no mistakes in epoch 6
[0 0 0 1] [1. 3. 3. 2. 1. 0.]
>>> params, mistakes = perceptron_fit(x, jnp.array([0, 1, 1, 0]), epochs=6)   # XOR
>>> print(perceptron_predict(params, x), mistakes)          # never converges
[1 1 0 0] [2. 3. 4. 4. 4. 4.]
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from fnn.activations import step

__all__ = ["perceptron_fit", "perceptron_predict"]


def perceptron_predict(params, x):
    """``step(x @ w + b)`` as 0/1 integers. ``x: [batch, features]``."""
    return step(x @ params["w"] + params["b"]).astype(jnp.int32)


@partial(jax.jit, static_argnames=("epochs",))
def _fit(x, y, w, b, lr, epochs):
    def sample(wb, xy):
        w, b = wb
        xi, yi = xy
        error = yi - step(xi @ w + b)                       # 0 when right, ±1 on a mistake
        return (w + lr * error * xi, b + lr * error), jnp.abs(error)

    def epoch(wb, _):
        wb, mistakes = jax.lax.scan(sample, wb, (x, y))
        return wb, jnp.sum(mistakes)

    (w, b), mistakes = jax.lax.scan(epoch, (w, b), None, length=epochs)
    return w, b, mistakes


def perceptron_fit(x, y, *, epochs: int = 100, lr: float = 1.0):
    """Fit a perceptron with the perceptron rule from zero weights.

    **Arguments:** ``x: [n, features]`` floats, ``y: [n]`` labels in ``{0, 1}``.
    **Returns:** ``(params, mistakes)`` where ``params = {"w": [features], "b": []}`` and
    ``mistakes[e]`` counts the updates made in epoch ``e`` (all zero once it has converged).
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"perceptron_fit: expected x of shape (n, features), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"perceptron_fit: expected y of shape ({x.shape[0]},), got {y.shape}")
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(()).dtype
    x = x.astype(dtype)
    w0 = jnp.zeros((x.shape[1],), dtype)
    b0 = jnp.zeros((), dtype)
    w, b, mistakes = _fit(x, y.astype(dtype), w0, b0, jnp.asarray(lr, dtype), epochs)
    return {"w": w, "b": b}, mistakes
