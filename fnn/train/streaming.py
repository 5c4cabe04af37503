"""Training from an iterable of batches: prefetched to the device in the background and run in
compiled chunks of ``K`` steps (one ``lax.while_loop`` per chunk).

A source is any iterable of batches ``(x, target)`` or ``(x, target, model_kwargs)`` of NumPy
or JAX arrays (a generator, a ``grain`` loader, a memmap reader), or a function
``epoch -> iterable`` (1-based epoch; the way to get a fresh, reproducible order each epoch,
which :class:`fnn.train.BackupAndRestore` needs). A re-iterable (a list, a loader) is iterated
afresh each epoch; a one-shot iterator is consumed across epochs (``steps_per_epoch`` batches
each, or all of it in one epoch).

A background thread pulls host batches, validates them, stacks ``K`` batches of the same shape
into one ``(K, batch, ...)`` array (the last chunk of an epoch padded with copies of its last
batch and run with ``limit`` set to its real count, so one program serves every chunk), and
``jax.device_put`` s it while the device runs the previous chunk. A batch of another shape
(the partial last batch) runs as a chunk of one.
"""
from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

from fnn.train._batches import unpack


class Chunk(NamedTuple):
    """``stacked`` on the device ``(K, batch, ...)``, ``count`` real batches in it, ``host``
    (the host batches, for the rare non-finite report) and ``first`` (the index in the epoch
    of its first batch)."""

    stacked: tuple
    count: int
    host: list
    first: int


def is_stream(data) -> bool:
    """Whether ``data`` is a stream of batches rather than in-memory ``(x, target[, kw])``."""
    return not isinstance(data, (tuple, list, Mapping)) and (callable(data) or
                                                             hasattr(data, "__iter__"))


def epoch_batches(source, epoch: int, steps_per_epoch: int | None):
    """The iterator of one epoch's batches (see the module docstring)."""
    it = source(epoch) if callable(source) and not hasattr(source, "__iter__") else source
    it = iter(it)
    return itertools.islice(it, steps_per_epoch) if steps_per_epoch else it


def _signature(batch):
    return tuple((np.shape(a), np.asarray(a).dtype.str) for a in jax.tree.leaves(batch))


def _stack(batches, k):
    batches = batches + [batches[-1]] * (k - len(batches))
    return jax.tree.map(lambda *a: np.stack([np.asarray(b) for b in a]), *batches)


def _chunks(batches, k, check, where):
    """Group host batches into :class:`Chunk` s (on the host; ``device_put`` follows)."""
    main, group, first = None, [], 0
    for i, raw in enumerate(batches):
        b = unpack(raw, where)
        if check:
            check(b, f"{where} (batch {i + 1} of the epoch)")
        sig = _signature(b)
        main = sig if main is None else main
        if sig != main or len(group) == k:
            if group:
                yield Chunk(_stack(group, k), len(group), group, first)
            group, first = [], i
        if sig != main:
            yield Chunk(_stack([b], 1), 1, [b], i)
            first = i + 1
            continue
        group.append(b)
    if group:
        yield Chunk(_stack(group, k), len(group), group, first)


class Prefetch:
    """Iterate ``_chunks`` in a background thread, ``depth`` chunks ahead, already on the
    device(s): ``put(stacked)`` places each (``jax.device_put``; on a mesh, this process's
    batches split over its devices). Errors in the source or the checks are raised in the
    consuming thread; ``close`` stops the thread."""

    _END = object()

    def __init__(self, batches, k: int, check, where: str, depth: int = 2,
                 put=jax.device_put):
        self.queue, self.stop = queue.Queue(depth), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(batches, k, check, where, put),
                                       daemon=True)
        self.thread.start()

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, batches, k, check, where, put):
        try:
            for c in _chunks(batches, k, check, where):
                if not self._put(c._replace(stacked=put(c.stacked))):
                    return
            self._put(self._END)
        except BaseException as e:              # handed to the consumer, raised there
            self._put(e)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self.stop.set()
        self.thread.join()
