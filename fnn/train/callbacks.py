"""Per-epoch callbacks for :func:`fnn.train.fit`: early stopping, checkpoints, a CSV log, the
learning rate on a plateau, a time limit (and, in :mod:`fnn.train.resume`, backup and restore).

A callback is any ``cb(epoch, train_state, logs)`` called after each epoch (``logs``: that
epoch's row of the history). It returns ``None`` (go on), ``True`` or a string (stop; the
string is the reason) or a new :class:`~fnn.train.TrainState` (train on from it: how
:class:`ReduceLROnPlateau` lowers the rate). A callback with ``get_state()``/``set_state(d)``
(JSON-able dicts) has its state saved and restored by :class:`fnn.train.BackupAndRestore`.
Callbacks run in the order given, on the host once per epoch; unused, they cost nothing::

    fit(..., callbacks=[ModelCheckpoint("out/ckpt", keep_last=3), CSVLogger("out/log.csv"),
                        ReduceLROnPlateau(patience=3), TimeLimit(600), EarlyStopping(10)])
"""
from __future__ import annotations

import csv
import io
import math
import os

import jax

from fnn import checkpoint
from fnn.optim import learning_rate, set_learning_rate
from fnn.train.progress import say

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "CSVLogger", "ReduceLROnPlateau",
           "TimeLimit"]


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
    ``min_delta`` for ``patience`` epochs, then wait ``cooldown`` epochs (each counts, improving
    or not, as in PyTorch); never below
    ``min_lr``. The rate is optimizer state (:func:`fnn.optim.set_learning_rate`), so the
    compiled epoch is not recompiled. Needs a constant-rate fnn optimizer or an
    ``optax.inject_hyperparams`` one (``fit`` refuses any other before the first epoch).
    ``verbose``: say each cut in one line on stderr (``ReduceLROnPlateau: epoch 7: val_loss
    has not improved for 5 epochs; learning rate 0.001 -> 0.0001``)."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 5,
                 min_delta: float = 0.0, cooldown: int = 0, min_lr: float = 0.0,
                 verbose: bool = True):
        if not 0 < factor < 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1), got {factor}")
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.best, self.wait, self.cooling, self.verbose = math.inf, 0, 0, verbose

    def __call__(self, epoch, train_state, logs):
        value = _value("ReduceLROnPlateau", self.monitor, logs)
        improved = value < self.best - self.min_delta
        if improved:
            self.best, self.wait = value, 0
        if self.cooling:                # every epoch after a cut counts, improving or not
            self.cooling -= 1
            return None
        if improved:
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        self.wait, self.cooling = 0, self.cooldown
        lr = float(learning_rate(train_state.opt_state))
        new = max(lr * self.factor, self.min_lr)
        if new >= lr:
            return None
        if self.verbose and jax.process_index() == 0:
            say(f"ReduceLROnPlateau: epoch {epoch}: {self.monitor} has not improved for "
                f"{self.patience} epochs; learning rate {lr:.4g} -> {new:.4g}")
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


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs, and with ``restore_best`` hand back the best epoch's params and model state
    (``FitResult.best_epoch`` names it; the step count is not rolled back).

    ``patience``: an int, or a :func:`fnn.regularizers.early_stopping` rule (a pure, jittable
    ``(init, update)`` pair; its own ``min_delta`` then applies). ``monitor``: a history key;
    ``None`` watches ``"val_loss"`` with validation data, else ``"loss"``; names ending in
    ``accuracy`` or ``f1`` are maximised. Its state, the best params included, is a pytree that
    :class:`fnn.train.BackupAndRestore` saves with the run. At most one per ``fit``.
    """

    def __init__(self, patience=5, min_delta: float = 0.0, monitor: str | None = None,
                 restore_best: bool = True):
        if isinstance(patience, bool) or not (isinstance(patience, int) or (
                hasattr(patience, "init") and hasattr(patience, "update"))):
            raise TypeError(f"EarlyStopping: patience must be an int or a "
                            f"fnn.regularizers.early_stopping(...) rule, got {patience!r}")
        if isinstance(patience, int):
            from fnn.regularizers import early_stopping
            rule = early_stopping(patience, min_delta)
        elif min_delta:
            raise ValueError("EarlyStopping: min_delta belongs to the rule given as patience "
                             "(fnn.regularizers.early_stopping(patience, min_delta))")
        else:
            rule = patience
        self.rule, self.monitor, self.restore_best = rule, monitor, restore_best
        self.watching, self.state = monitor, None
        self._update = jax.jit(rule.update)

    def start(self, train_state, default_monitor: str):
        """Begin a run from ``train_state`` (``fit`` calls it before the first epoch)."""
        self.watching = self.monitor or default_monitor
        # a copy: fit's epochs donate the train state's buffers
        self.state = self.rule.init(jax.tree.map(jax.numpy.copy, (train_state.params,
                                                                  train_state.state)))

    def __call__(self, epoch, train_state, logs):
        """Feed one epoch; return the reason to stop, or ``None``."""
        value = _value("fit", self.watching, logs)
        self.state = self._update(self.state, value, (train_state.params, train_state.state))
        if bool(self.state.stop):
            return (f"fit: early stopping after epoch {epoch}: {self.watching} has not "
                    f"improved for {int(self.state.wait)} epochs")
        return None

    def finish(self, train_state):
        """``(train_state, best epoch)``, with the best params and state if ``restore_best``
        (``fit`` calls it after the last epoch)."""
        if self.restore_best and int(self.state.step) > 0:
            p, s = self.state.best_params
            train_state = train_state._replace(params=p, state=s)
        return train_state, int(self.state.best_step) + 1
