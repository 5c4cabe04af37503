"""Named, runnable training tasks: what ``fnn list`` shows and ``fnn train NAME`` runs.

A task module in this package calls :func:`register` at import time; :func:`load_all` imports
every module here, so a new file joins the CLI without further wiring.

A :class:`Task` has

- ``train(*, epochs=None, lr=None, batch_size=None, seed=0, out="out", quiet=False,
  quick=False, resume=False, precision=None) -> dict``: runs the whole story (data, model, training with
  progress, evaluation, checkpoint and plots written under ``out``) and returns its final
  metrics (e.g. ``{"test_accuracy": 0.985}``); ``None`` means the task's default (see
  :func:`default`: ``0`` is a value, not "the default"); ``quick`` a tiny run for tests;
  ``resume`` continues from the checkpoints in ``out/ckpt`` (see :func:`backup_callbacks`).
- ``problem(seed=0) -> (model, loss, params, state, x, target)``: a small batch for
  ``fnn gradcheck NAME``, which checks the hand-derived gradient against autodiff and finite
  differences on it.
"""
from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from typing import Callable, NamedTuple

__all__ = ["Task", "register", "get", "names", "load_all", "broken", "default",
           "backup_callbacks", "artifact_dir"]


class Task(NamedTuple):
    name: str
    summary: str
    train: Callable
    problem: Callable


_TASKS: dict[str, Task] = {}
_BROKEN: dict[str, str] = {}          # task module -> why it failed to import


def register(task: Task) -> Task:
    """Add ``task`` to the registry (its name must be new)."""
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def load_all() -> None:
    """Import every task module in this package. A module that fails to import does not take
    the others down: it is recorded (see :func:`broken`) and its tasks are missing."""
    for info in pkgutil.iter_modules(__path__):
        if info.name in _BROKEN:
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:                                          # noqa: BLE001
            _BROKEN[info.name] = f"{type(e).__name__}: {e}"


def broken() -> dict[str, str]:
    """Task modules that failed to import, each with its error (after :func:`load_all`)."""
    load_all()
    return dict(_BROKEN)


def names() -> list[str]:
    """The registered task names, sorted."""
    load_all()
    return sorted(_TASKS)


def get(name: str) -> Task:
    """The task called ``name``; ``KeyError`` listing the known names otherwise."""
    load_all()
    if name not in _TASKS:
        failed = "".join(f"; task module {m!r} failed to import ({e})" for m, e in _BROKEN.items())
        close = difflib.get_close_matches(str(name).replace("_", "-").lower(), sorted(_TASKS), 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown task {name!r}{hint}; known tasks: {', '.join(sorted(_TASKS))}"
                       f"{failed}")
    return _TASKS[name]


def default(value, fallback):
    """``value`` unless it is ``None``: ``epochs=0`` or ``lr=0.0`` are the caller's values and
    are not replaced by the task's defaults (``value or fallback`` would)."""
    return fallback if value is None else value


def backup_callbacks(resume: bool, out: str) -> list:
    """The :func:`fnn.train.fit` callbacks for ``fnn train --resume``:
    ``[BackupAndRestore(out/ckpt)]`` with ``resume``, ``[]`` for a plain run."""
    from fnn.train import BackupAndRestore
    return [BackupAndRestore(os.path.join(out, "ckpt"))] if resume else []


def artifact_dir(out: str) -> str:
    """Where this process writes a task's files (checkpoint, plots, samples): ``out`` on
    process 0, the only process of a plain run. The other processes of a multi-process run
    (``python -m fnn.sharding.launch -- fnn train ...``) write to a scratch directory removed
    at exit, so the files are written once, not once per process."""
    import jax
    if jax.process_index() == 0:
        return out
    import atexit
    import shutil
    import tempfile
    scratch = tempfile.mkdtemp(prefix=f"fnn-process-{jax.process_index()}-")
    atexit.register(shutil.rmtree, scratch, True)
    return scratch
