"""One epoch of ``fit``: in memory (one compiled call) or streamed (compiled chunks), with the
replay that recovers the last good state after a non-finite step, and validation."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn.train.epoch import batch_order, make_eval_batch
from fnn.train.step import _unpack
from fnn.train.streaming import Prefetch
from fnn.train.validate import _validate_data, inputs_finite


class Bad(NamedTuple):
    """A non-finite step: ``step`` (global update index), ``index`` (batch of the epoch,
    0-based) and whether that batch's ``inputs_finite``."""

    step: int
    index: int
    inputs_finite: bool


def _add(a, b):
    return b if a is None else jax.tree.map(jnp.add, a, b)


def memory_epoch(run_epoch, sizes, ts, data, shuffle):
    """``(train_state, sums, Bad | None)`` for one in-memory epoch."""
    before = ts
    ts, steps, bad, sums = run_epoch(before, data, np.int32(len(sizes)))
    if not bool(bad):
        return ts, sums, None
    good = int(steps) - 1                   # replay up to the bad step: the last good state
    ts, _, _, sums = run_epoch(before, data, np.int32(good))
    n = jax.tree.leaves(data)[0].shape[0]
    start = sum(sizes[:good])
    idx = np.asarray(batch_order(before, n, shuffle))[start:start + sizes[good]]
    batch = jax.tree.map(lambda a: np.asarray(a)[idx], data)
    return ts, sums, Bad(int(before.step) + good, good, inputs_finite(batch))


def stream_epoch(run_chunk, ts, batches, k, check, where):
    """``(train_state, sums or None if no batch came, Bad | None)`` for one streamed epoch.

    Chunk ``j + 1`` is dispatched before chunk ``j``'s non-finite flag is read, so the device
    never waits for the host; a bad chunk's successor is dropped and the bad one replayed."""
    pre = Prefetch(batches, k, check, where)
    total, prev, bad = None, None, None
    try:
        for chunk in pre:
            res = run_chunk(ts, chunk.stacked, np.int32(chunk.count))
            if prev is not None:
                if bool(prev[2][2]):
                    bad = prev
                    break
                total = _add(total, prev[2][3])
            prev, ts = (ts, chunk, res), res[0]
        else:
            if prev is not None and bool(prev[2][2]):
                bad = prev
            elif prev is not None:
                total = _add(total, prev[2][3])
    finally:
        pre.close()
    if bad is None:
        return ts, total, None
    before, chunk, res = bad
    good = int(res[1]) - 1
    ts, _, _, sums = run_chunk(before, chunk.stacked, np.int32(good))
    return ts, _add(total, sums), Bad(int(before.step) + good, chunk.first + good,
                                      inputs_finite(chunk.host[good]))


def logs_from_sums(sums, metrics, grad_norm: bool, prefix: str = "") -> dict:
    """The history row's means from an epoch's sums."""
    n = float(sums.examples) if sums is not None else 0.0
    mean = lambda v: float(v) / n if n else math.nan
    logs = {prefix + "loss": mean(sums.loss) if sums is not None else math.nan}
    for i, m in enumerate(metrics):
        logs[prefix + m.name] = float(m.result(sums.stats[i])) if n else math.nan
    if grad_norm:
        logs["grad_norm"] = mean(sums.grad_norm) if sums is not None else math.nan
    return logs


def stream_eval(model, loss, metrics, params, state, batches, check, where) -> dict:
    """Validation over an iterable of batches, one compiled call per batch, summed."""
    run = make_eval_batch(model, loss, metrics)
    total = None
    for i, raw in enumerate(batches):
        b = _unpack(raw, where)
        if check:
            _validate_data(b, f"{where} (batch {i + 1})")
        total = _add(total, run(params, state, jax.device_put(b)))
    if total is None:
        raise ValueError(f"{where}: the validation data gave no batch")
    lsum, stats, n = total
    return {"val_loss": float(lsum) / float(n),
            **{"val_" + m.name: float(m.result(s)) for m, s in zip(metrics, stats)}}
