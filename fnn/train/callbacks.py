"""Per-epoch callbacks for :func:`fnn.train.fit`, and its early stopping.

A callback is any ``cb(epoch, train_state, logs)`` called after each epoch (``logs``: that
epoch's row of the history). It returns ``None`` (go on), ``True`` or a string (stop; the
string is the reason) or a new :class:`~fnn.train.TrainState` (train on from it: how
:class:`ReduceLROnPlateau` lowers the rate). A callback with ``get_state()``/``set_state(d)``
(JSON-able dicts) has its state saved and restored by ``fit(..., resume=True)``. Unused, they
cost nothing; these four run on the host once per epoch::

    fit(..., callbacks=[ModelCheckpoint("out/ckpt", keep_last=3), CSVLogger("out/log.csv"),
                        ReduceLROnPlateau(patience=3), TimeLimit(600)])
"""
from __future__ import annotations

import csv
import io
import math
import os

import jax

from fnn import checkpoint
from fnn.optim import learning_rate, set_learning_rate

__all__ = ["Callback", "ModelCheckpoint", "CSVLogger", "ReduceLROnPlateau", "TimeLimit"]


def maximise(monitor: str) -> bool:
    """Names ending in ``accuracy`` or ``f1`` are maximised, everything else minimised."""
    return monitor.endswith(("accuracy", "f1"))


def _value(name, monitor, logs):
    if monitor not in logs:
        raise ValueError(f"{name}: cannot monitor {monitor!r}; this run logs {sorted(logs)}")
    v = float(logs[monitor])
    return -v if maximise(monitor) else v


class Callback:
    """Base class: override ``__call__``; ``get_state``/``set_state`` for resume."""

    def __call__(self, epoch, train_state, logs):
        return None

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict):
        pass


class ModelCheckpoint(Callback):
    """Save the train state atomically (:func:`fnn.checkpoint.save`) to ``directory``: the
    best epoch so far by ``monitor`` as ``best.safetensors`` and the last ``keep_last``
    epochs as ``epoch_0007.safetensors`` (older ones deleted). Metadata: ``epoch`` and the
    monitored value."""

    def __init__(self, directory, monitor: str = "val_loss", keep_last: int = 1,
                 save_best: bool = True):
        if keep_last < 0:
            raise ValueError(f"ModelCheckpoint: keep_last must be >= 0, got {keep_last}")
        self.directory, self.monitor = os.fspath(directory), monitor
        self.keep_last, self.save_best = keep_last, save_best
        self.best, self.kept = math.inf, []

    def __call__(self, epoch, train_state, logs):
        meta = {"epoch": epoch}
        if self.save_best:
            value = _value("ModelCheckpoint", self.monitor, logs)
            meta[self.monitor] = logs[self.monitor]
            if value < self.best:
                self.best = value
                checkpoint.save(os.path.join(self.directory, "best.safetensors"),
                                train_state, metadata=meta)
        if self.keep_last:
            path = os.path.join(self.directory, f"epoch_{epoch:04d}.safetensors")
            checkpoint.save(path, train_state, metadata=meta)
            self.kept = [p for p in self.kept if p != path] + [path]
            for old in self.kept[:-self.keep_last]:
                if os.path.exists(old):
                    os.unlink(old)
            self.kept = self.kept[-self.keep_last:]

    def get_state(self):
        return {"best": self.best, "kept": self.kept}

    def set_state(self, state):
        self.best, self.kept = state["best"], list(state["kept"])


class CSVLogger(Callback):
    """The history as a CSV file at ``path``, one row per epoch, rewritten atomically each
    epoch (so a resumed run's file has each epoch once)."""

    def __init__(self, path):
        self.path, self.rows = os.fspath(path), []

    def __call__(self, epoch, train_state, logs):
        self.rows.append({k: v for k, v in logs.items()})
        names = list(dict.fromkeys(k for r in self.rows for k in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(out.getvalue())
        os.replace(tmp, self.path)

    def get_state(self):
        return {"rows": self.rows}

    def set_state(self, state):
        self.rows = [dict(r) for r in state["rows"]]


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs, then wait ``cooldown`` epochs; never below
    ``min_lr``. The rate is optimizer state (:func:`fnn.optim.set_learning_rate`), so the
    compiled epoch is not recompiled. Needs a constant-rate fnn optimizer or an
    ``optax.inject_hyperparams`` one."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 5,
                 min_delta: float = 0.0, cooldown: int = 0, min_lr: float = 0.0):
        if not 0 < factor < 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1), got {factor}")
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.best, self.wait, self.cooling = math.inf, 0, 0

    def __call__(self, epoch, train_state, logs):
        value = _value("ReduceLROnPlateau", self.monitor, logs)
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return None
        if self.cooling:
            self.cooling -= 1
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        self.wait, self.cooling = 0, self.cooldown
        lr = float(learning_rate(train_state.opt_state))
        new = max(lr * self.factor, self.min_lr)
        if new >= lr:
            return None
        return train_state._replace(opt_state=set_learning_rate(train_state.opt_state, new))

    def get_state(self):
        return {"best": self.best, "wait": self.wait, "cooling": self.cooling}

    def set_state(self, state):
        self.best, self.wait, self.cooling = state["best"], state["wait"], state["cooling"]


class TimeLimit(Callback):
    """Stop before the wall-clock budget of ``seconds`` runs out: after an epoch, when the time
    so far (the history's ``time``: training and validation) plus the longest epoch yet would
    exceed it."""

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"TimeLimit: seconds must be positive, got {seconds}")
        self.seconds, self.elapsed, self.longest = float(seconds), 0.0, 0.0

    def __call__(self, epoch, train_state, logs):
        self.elapsed += logs["time"]
        self.longest = max(self.longest, logs["time"])
        if self.elapsed + self.longest > self.seconds:
            return (f"fit: stopped after epoch {epoch}: another epoch would exceed the time "
                    f"limit of {self.seconds:g} s ({self.elapsed:.1f} s used)")
        return None

    def get_state(self):
        return {"elapsed": self.elapsed, "longest": self.longest}

    def set_state(self, state):
        self.elapsed, self.longest = state["elapsed"], state["longest"]


class _EarlyStop:
    """Early stopping on ``monitor`` with :func:`fnn.regularizers.early_stopping` (a pure,
    jittable rule); watches ``(params, state)`` so that the best of both can be restored.
    Its state (a pytree) is part of what ``resume`` saves."""

    def __init__(self, rule, min_delta, monitor, ts):
        if isinstance(rule, int):
            from fnn.regularizers import early_stopping
            rule = early_stopping(rule, min_delta)
        self.update, self.monitor = jax.jit(rule.update), monitor
        # a copy: fit's epochs donate the train state's buffers
        self.state = rule.init(jax.tree.map(jax.numpy.copy, (ts.params, ts.state)))

    def __call__(self, epoch, ts, logs):
        """Feed one epoch; return the reason to stop, or ``None``."""
        value = _value("fit", self.monitor, logs)
        self.state = self.update(self.state, value, (ts.params, ts.state))
        if bool(self.state.stop):
            return (f"fit: early stopping after epoch {epoch}: {self.monitor} has not improved "
                    f"for {int(self.state.wait)} epochs")
        return None

    def finish(self, ts, restore):
        """``(train_state, best epoch)``, with the best params and state if ``restore``."""
        if restore and int(self.state.step) > 0:
            p, s = self.state.best_params
            ts = ts._replace(params=p, state=s)
        return ts, int(self.state.best_step) + 1
