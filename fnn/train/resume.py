"""Resume after a crash: the whole state of a ``fit`` run in one atomic file per directory.

After every epoch ``fit(..., callbacks=[BackupAndRestore(d)])`` writes
``d/fit_state.safetensors`` with :func:`fnn.checkpoint.save` (temporary file, ``fsync``,
rename: a crash at any moment leaves the previous epoch's file or this one, never a torn one).
Arrays: the train state (params, model state, optimizer state, step, key: the key fixes the
next shuffles) and the early-stopping state (best params included). Metadata (JSON): the epoch,
the history, each callback's ``get_state()`` and the stop reason. When the file is there at the
start, ``fit`` loads it and trains on from the next epoch; every epoch is the same compiled
program on the same inputs, so a run killed and resumed ends with the same bytes as one never
interrupted.
"""
from __future__ import annotations

import json
import os

from fnn import checkpoint

FILE = "fit_state.safetensors"

__all__ = ["BackupAndRestore"]


class BackupAndRestore:
    """Back the whole run up to ``directory`` after every epoch, and restore it at the start.

    ``fit(..., callbacks=[BackupAndRestore("out/run")])``: after each epoch (once every other
    callback has run) the train state, early stopping's state, the epoch, the history, each
    callback's ``get_state()`` and the stop reason are written atomically to
    ``directory/fit_state.safetensors`` (by process 0 of a multi-process run). When that file
    exists as ``fit`` starts, the run continues after its last saved epoch (a finished run
    returns at once): a run killed at any moment and started again with the same arguments
    ends with the same bytes as one never interrupted. ``resume=False`` starts afresh and
    overwrites the backup. The callbacks must be the same, in the same order. At most one
    per ``fit``; where it sits in the list does not matter.
    """

    def __init__(self, directory, *, resume: bool = True):
        self.directory, self.resume = os.fspath(directory), bool(resume)

    def __call__(self, epoch, train_state, logs):
        return None                     # fit saves after every other callback has run

    def __repr__(self):
        return f"BackupAndRestore({self.directory!r}, resume={self.resume})"


def path(directory) -> str:
    return os.path.join(os.fspath(directory), FILE)


def save_run(directory, train_state, early_stopping, epoch: int, history: dict, callbacks,
             reason):
    """Write the run's state after ``epoch`` (see the module docstring)."""
    info = {"epoch": epoch, "history": history, "stop_reason": reason,
            "callbacks": [cb.get_state() if hasattr(cb, "get_state") else None
                          for cb in callbacks]}
    checkpoint.save(path(directory), {"train_state": train_state,
                                      "early_stopping": early_stopping},
                    metadata={"fit": json.dumps(info)})


def load_run(directory, train_state, early_stopping):
    """``None`` if ``directory`` holds no saved run, else ``(train_state, early_stopping,
    info)`` with the arrays shaped like the given ones (a mismatch raises
    :class:`fnn.checkpoint.CheckpointMismatchError` naming every difference)."""
    p = path(directory)
    if not os.path.exists(p):
        return None
    tree = checkpoint.load(p, like={"train_state": train_state,
                                    "early_stopping": early_stopping})
    info = json.loads(checkpoint.read_metadata(p)["fit"])
    return tree["train_state"], tree["early_stopping"], info


def restore_callbacks(callbacks, states):
    """Hand each callback (by position) the state it saved."""
    if len(states) != len(callbacks):
        raise ValueError(f"fit: resume: the saved run had {len(states)} callbacks, this one "
                         f"has {len(callbacks)}")
    for cb, s in zip(callbacks, states):
        if s is not None and hasattr(cb, "set_state"):
            cb.set_state(s)
