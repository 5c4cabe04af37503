"""A TensorBoard log of the history: :class:`TensorBoard`, a callback for :func:`fnn.train.fit`.

Each epoch's row of the history (loss, metrics, ``val_*``, ``lr``, ``grad_norm``,
``loss_scale``, ``time``: every number in it but ``epoch``) becomes one scalar per column at
step = the epoch, in an event file under ``log_dir`` that ``tensorboard --logdir`` reads. It
needs ``tensorboardX`` (``pip install 'fnn[tensorboard]'``), imported when the callback is
made, so importing fnn never needs it.

The file is opened, appended to, flushed and closed once per logged epoch: it is complete after
every epoch and nothing stays open after ``fit`` returns or is killed. With
:class:`fnn.train.BackupAndRestore` a resumed run appends to the same file, cut back first to
its size at the backup, so an epoch logged after the last backup (a crash between this
callback's write and the backup's) is not there twice.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import jax
import numpy as np

from fnn.train.callbacks import Callback

__all__ = ["TensorBoard"]

_files = itertools.count()


def _import():
    try:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import masked_crc32c
    except ImportError as e:
        raise ImportError("TensorBoard: the TensorBoard callback needs tensorboardX; "
                          "install it with: pip install 'fnn[tensorboard]' "
                          f"(import failed: {e})") from e
    return Event, Summary, masked_crc32c


def _number(v) -> bool:
    if isinstance(v, (bool, np.bool_)) or np.ndim(v) != 0:
        return False
    return np.issubdtype(np.asarray(v).dtype, np.number)


class TensorBoard(Callback):
    """Log every number of each epoch's history row as a TensorBoard scalar (tag = the
    history's column name, step = the epoch) under ``log_dir``, every ``every`` epochs.

    ::

        fit(..., callbacks=[TensorBoard("runs/mnist"), BackupAndRestore("runs/mnist/backup")])
        # then: tensorboard --logdir runs

    Raises :class:`ImportError` (naming ``pip install 'fnn[tensorboard]'``) when tensorboardX
    is not installed. A second ``fit`` with the same callback object starts a new event file;
    a run resumed by :class:`fnn.train.BackupAndRestore` appends to its own. Only process 0
    writes.
    """

    def __init__(self, log_dir, *, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"TensorBoard: every must be an int >= 1, got {every!r}")
        self._event, self._summary, self._crc = _import()
        self.log_dir, self.every = os.fspath(log_dir), every
        self.file, self.size, self.last = None, 0, 0      # file name, its bytes, last epoch

    def __call__(self, epoch, train_state, logs):
        if epoch <= self.last:                  # a new run with this callback: a new file
            self.file, self.size = None, 0
        self.last = epoch
        if epoch % self.every or jax.process_index() != 0:
            return None
        records = []
        if self.file is None:
            self.file = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                         f"{os.getpid()}.{next(_files)}.fnn")
            records.append(self._event(wall_time=time.time(), file_version="brain.Event:2"))
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v))
                                       for k, v in logs.items() if k != "epoch" and _number(v)])
        records.append(self._event(wall_time=time.time(), step=epoch, summary=summary))
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, self.file), "ab") as f:
            for r in records:
                f.write(self._record(r.SerializeToString()))
            f.flush()
            os.fsync(f.fileno())
            self.size = f.tell()
        return None

    def _record(self, data: bytes) -> bytes:
        """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
        header = struct.pack("<Q", len(data))
        return (header + struct.pack("<I", self._crc(header)) + data
                + struct.pack("<I", self._crc(data)))

    def get_state(self):
        return {"file": self.file, "size": self.size, "last": self.last}

    def set_state(self, state):
        self.file, self.size, self.last = state["file"], state["size"], state["last"]
        if self.file is not None and jax.process_index() == 0:
            path = os.path.join(self.log_dir, self.file)
            if os.path.exists(path) and os.path.getsize(path) > self.size:
                os.truncate(path, self.size)    # epochs written after the backup: again soon

    def __repr__(self):
        return f"TensorBoard({self.log_dir!r}, every={self.every})"
