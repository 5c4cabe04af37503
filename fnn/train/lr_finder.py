"""The LR range test."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn.train._batches import as_data, input_shape
from fnn.train.step import create_train_state, step_core

__all__ = ["LRFindResult", "lr_find"]


class LRFindResult(NamedTuple):
    """``lrs`` and ``losses`` of the sweep (up to where it stopped), ``suggestion`` (a tenth of
    the rate at the lowest smoothed loss) and ``diverged`` (the 4×-best rule fired)."""

    lrs: np.ndarray
    losses: np.ndarray
    suggestion: float
    diverged: bool

    def plot(self, path):
        """Loss against learning rate (log axis) to ``path`` (see :func:`fnn.plot.lr_finder`)."""
        from fnn import plot
        return plot.lr_finder(self, path)


def _smooth(losses, beta=0.98):
    """Bias-corrected exponential moving average, as fastai's LR finder."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out)


def lr_find(model, loss, make_optimizer: Callable, train_data, *, batch_size: int, key,
            min_lr: float = 1e-7, max_lr: float = 10.0, steps: int = 100, params=None,
            state=None, grad: str | Callable = "autodiff", divergence: float = 4.0, plot=None
            ) -> LRFindResult:
    """LR range test: train from ``min_lr`` upward by a constant factor per step up to
    ``max_lr``; stop when the loss exceeds ``divergence`` (4) times its best so far or turns
    non-finite; suggest a rate a tenth of the one at the lowest smoothed loss.

    ``lr_t = min_lr·(max_lr/min_lr)^(t/(steps-1))``. ``make_optimizer(schedule)`` builds the
    optimizer from a schedule ``step -> rate`` (``lambda lr: fnn.optim.adam(lr)``). All
    ``steps`` run as one compiled scan over shuffled minibatches (reshuffled after each pass);
    ``plot=path`` writes loss against rate (log axis) as a PNG. Params are not changed.
    """
    if hasattr(make_optimizer, "init") or not callable(make_optimizer):
        raise TypeError("lr_find: make_optimizer must be a function schedule -> optimizer "
                        f"(e.g. lambda lr: fnn.optim.sgd(lr)), got {make_optimizer!r}")
    if not 0 < min_lr < max_lr or steps < 2:
        raise ValueError(f"lr_find: need 0 < min_lr < max_lr and steps >= 2, got min_lr="
                         f"{min_lr}, max_lr={max_lr}, steps={steps}")
    data, n = as_data(train_data, "lr_find: train_data")
    if batch_size > n:
        raise ValueError(f"lr_find: batch_size {batch_size} exceeds the {n} examples")
    ratio = (max_lr / min_lr) ** (1.0 / (steps - 1))
    optimizer = make_optimizer(lambda count: min_lr * ratio ** count)
    k_init, k_data = jax.random.split(key)
    ts = create_train_state(model, optimizer, k_init, input_shape(data[0], batch_size),
                            params=params, state=state)
    passes = math.ceil(steps * batch_size / n)
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(k_data, p), n)
                             for p in range(passes)])[:steps * batch_size]
    core = step_core(model, loss, optimizer.update, grad)

    @jax.jit
    def sweep(ts, data, idx):       # steps after a non-finite loss are cut off below
        return jax.lax.scan(lambda t, i: core(t, jax.tree.map(lambda a: a[i], data)), ts,
                            idx)[1].loss
    losses = np.asarray(sweep(ts, data, order.reshape(steps, batch_size)), np.float64)
    lrs = min_lr * ratio ** np.arange(steps)
    best = np.minimum.accumulate(np.where(np.isfinite(losses), losses, np.inf))
    bad = ~np.isfinite(losses) | (losses > divergence * best)
    stop = int(np.argmax(bad)) if bad.any() else steps - 1
    lrs, losses = lrs[:stop + 1], losses[:stop + 1]
    finite = np.isfinite(losses)
    smooth = _smooth(losses[finite])
    suggestion = float(lrs[finite][int(np.argmin(smooth))] / 10) if finite.any() else min_lr
    result = LRFindResult(lrs, losses, suggestion, bool(bad.any()))
    if plot:
        result.plot(plot)
    return result
