"""``fit``: epochs, validation, history, progress, callbacks and early stopping."""
from __future__ import annotations

import time
import warnings
from typing import Callable, NamedTuple

import jax
import numpy as np

from fnn.train.epoch import _make_epoch, _make_eval
from fnn.train.metrics import _accuracy_fn
from fnn.train.progress import _EarlyStop, _nonfinite_message, _Progress
from fnn.train.step import TrainState, _as_data, create_train_state

class FitResult(NamedTuple):
    """``train_state`` after training; ``history``: per-epoch lists (``epoch``, ``loss``,
    ``accuracy``, ``val_loss``, ``val_accuracy``, ``lr``, ``grad_norm``, ``time``);
    ``stop_reason``: ``None`` if all epochs ran; ``best_epoch`` (1-based) with early stopping."""

    train_state: TrainState
    history: dict
    stop_reason: str | None = None
    best_epoch: int | None = None


def _input_shape(x, batch_size):
    if isinstance(x, (tuple, list)):
        return tuple((batch_size,) + tuple(a.shape[1:]) for a in x)
    return (batch_size,) + tuple(x.shape[1:])


def _learning_rate(learning_rate, opt_state, step):
    """The rate of the last update: from ``learning_rate`` (float or schedule), else from an
    optax ``inject_hyperparams`` state, else NaN."""
    if callable(learning_rate):
        return float(learning_rate(max(step - 1, 0)))
    if learning_rate is not None:
        return float(learning_rate)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams")):
        if "learning_rate" in getattr(node, "hyperparams", {}):
            return float(node.hyperparams["learning_rate"])
    return float("nan")


def _epoch_logs(ms, sizes, good):
    """Example-weighted means over the first ``good`` steps of one epoch's metrics."""
    w = np.asarray(sizes[:good], np.float64)
    mean = lambda a: float(np.sum(np.asarray(a[:good], np.float64) * w) / w.sum()) if good \
        else float("nan")
    return {"loss": mean(ms.loss), "accuracy": mean(ms.accuracy),
            "grad_norm": mean(ms.grad_norm)}




def fit(model, loss, optimizer, train_data, *, epochs: int, batch_size: int, val_data=None,
        key=None, params=None, state=None, train_state: TrainState | None = None,
        grad: str | Callable = "autodiff", accuracy="auto", regularizer=None, learning_rate=None,
        shuffle: bool = True, drop_last: bool = False, early_stopping=None,
        min_delta: float = 0.0, monitor: str | None = None, restore_best: bool = True,
        callbacks=(), on_nonfinite: str = "stop", progress="auto", grad_norm: bool = True,
        eval_batch_size: int = 512) -> FitResult:
    """Train ``model`` on ``train_data = (x, target[, model_kwargs])`` for ``epochs`` epochs.

    Each epoch is one compiled call (see the module docstring); the first compiles, the rest
    reuse it. After each epoch: validation loss/accuracy on ``val_data`` (eval mode, one
    compiled scan), a row of ``history``, the progress bar, ``callbacks`` (each
    ``cb(epoch, train_state, logs)``; returning ``True`` stops), early stopping.

    **Arguments:** ``optimizer``: any optax-shaped ``(init, update)`` pair. Start from
    ``key`` (with ``params``/``state`` or ``model.init``) or from ``train_state``. ``grad``:
    ``"autodiff"``, ``"manual"`` (hand-derived backprop) or a gradient function (see
    :func:`make_step`). ``accuracy``: ``"auto"``, ``None`` or
    ``fn(pred, target) -> [batch]``. ``regularizer``: a ``fnn.regularizers.Regularizer`` added
    to the objective (history shows the data loss). ``learning_rate`` (float or schedule) is
    only recorded in the history. ``early_stopping``: a patience (int) or a
    ``fnn.regularizers.early_stopping(...)`` pair, watching ``monitor`` (``"val_loss"`` when
    there is validation data, else ``"loss"``; names ending in ``accuracy`` are maximised);
    with ``restore_best`` the best epoch's params and state are returned.
    ``on_nonfinite``: ``"stop"`` (warn and return) or ``"raise"`` (``FloatingPointError``).
    ``progress``: ``"auto"`` (a tqdm bar on a terminal), ``True``, ``"lines"``, ``False``.
    ``grad_norm=False``: skip the gradient norm (NaN in the history; see :func:`make_step`).
    """
    if on_nonfinite not in ("stop", "raise"):
        raise ValueError(f"fit: on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    data, n = _as_data(train_data, "fit: train_data")
    if train_state is not None and (params is not None or state is not None):
        raise ValueError("fit: pass params/state or train_state, not both")
    if train_state is None:
        if key is None:
            raise ValueError("fit: pass key= (a jax.random key) or train_state=")
        train_state = create_train_state(model, optimizer, key,
                                         _input_shape(data[0], min(batch_size, n)),
                                         params=params, state=state)
    acc = _accuracy_fn(loss, accuracy)
    run_epoch, sizes = _make_epoch(model, loss, optimizer, grad, acc, regularizer, grad_norm,
                                   n, batch_size, drop_last, shuffle)
    val = _as_data(val_data, "fit: val_data") if val_data is not None else None
    run_eval = val and _make_eval(model, loss, acc, val[1], min(eval_batch_size, val[1]))
    stopper = None if early_stopping is None else _EarlyStop(
        early_stopping, min_delta, monitor or ("val_loss" if val else "loss"), train_state)
    history, reason, bar = {}, None, _Progress(progress, epochs)
    try:
        for epoch in range(1, epochs + 1):
            t0, start, before = time.perf_counter(), int(train_state.step), train_state
            train_state, steps, bad, ms = run_epoch(before, data, np.int32(len(sizes)))
            good = int(steps) - bool(bad)
            if bool(bad):                   # replay up to the bad step: the last good state
                train_state = run_epoch(before, data, np.int32(good))[0]
            logs = {"epoch": epoch, **_epoch_logs(jax.device_get(ms), sizes, good)}
            if run_eval:
                vl, va = run_eval(train_state.params, train_state.state, val[0])
                logs.update(val_loss=float(vl), val_accuracy=float(va))
            if acc is None:
                logs = {k: v for k, v in logs.items() if not k.endswith("accuracy")}
            logs.update(lr=_learning_rate(learning_rate, train_state.opt_state,
                                          int(train_state.step)),
                        time=time.perf_counter() - t0)
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            bar.update(logs)
            if bool(bad):
                reason = _nonfinite_message(epoch, start + good, start)
            elif any([cb(epoch, train_state, logs) for cb in callbacks]):   # call every one
                reason = f"fit: a callback stopped training after epoch {epoch}"
            elif stopper:
                reason = stopper(epoch, train_state, logs)
            if reason:
                break
    finally:
        bar.close(reason)
    best = None
    if stopper:
        train_state, best = stopper.finish(train_state, restore_best)
    if reason and reason.startswith("fit: non-finite"):
        if on_nonfinite == "raise":
            raise FloatingPointError(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return FitResult(train_state, history, reason, best)


