"""Validation during ``fit``: :class:`InMemoryVal` (arrays, one compiled scan) and
:class:`StreamedVal` (an iterable of batches, :func:`stream_eval`), one interface
(``logs(train_state, before_read)``) whatever the data is."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import numpy as np

from fnn.train._batches import unpack
from fnn.train.epoch import make_eval_batch
from fnn.train.streaming import epoch_batches


def stream_eval(model, loss, metrics, params, state, batches, check, where,
                put=jax.device_put, get=jax.device_get) -> dict:
    """Validation over an iterable of batches, one compiled call per batch, summed; ``put``
    places a host batch, ``get`` reads the sums back."""
    run = make_eval_batch(model, loss, metrics)
    total = None
    for i, raw in enumerate(batches):
        b = unpack(raw, where)
        if check:
            check(b, f"{where} (batch {i + 1})")
        sums = get(run(params, state, put(b)))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
    if total is None:
        raise ValueError(f"{where}: the validation data gave no batch")
    lsum, stats, n = total
    return {"val_loss": float(lsum) / float(n),
            **{"val_" + m.name: float(m.result(s)) for m, s in zip(metrics, stats)}}


class InMemoryVal(NamedTuple):
    """Validation on arrays: ``run(params, state, x) -> (mean loss, metric results)`` (one
    compiled scan) on ``data``."""

    run: Callable
    data: tuple
    metrics: tuple

    def logs(self, ts, before_read):
        vl, results = self.run(ts.params, ts.state, self.data)
        before_read()
        return {"val_loss": float(vl),
                **{"val_" + m.name: float(r) for m, r in zip(self.metrics, results)}}


class StreamedVal(NamedTuple):
    """Validation on a stream: each batch checked, placed with ``put``, summed with ``get``."""

    source: object
    model: object
    loss: Callable
    metrics: tuple
    check: Callable | None
    put: Callable
    get: Callable

    def logs(self, ts, before_read):
        before_read()
        return stream_eval(self.model, self.loss, self.metrics, ts.params, ts.state,
                           epoch_batches(self.source, 1, None), self.check, "fit: val_data",
                           self.put, self.get)
