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
from fnn.train.validate import inputs_finite


class Bad(NamedTuple):
    """A non-finite step: ``step`` (global update index), ``index`` (batch of the epoch,
    0-based) and whether that batch's ``inputs_finite``."""

    step: int
    index: int
    inputs_finite: bool
    params_finite: bool = True


def _finite(ts) -> bool:
    """Whether the params and optimizer state hold only finite values (host check; each
    process reads the shards it holds, so a state spread over processes needs no gather)."""
    return all(np.all(np.isfinite(np.asarray(s.data))) for a in jax.tree.leaves(
        (ts.params, ts.opt_state)) if jnp.issubdtype(a.dtype, jnp.inexact)
        for s in jnp.asarray(a).addressable_shards)


def copy_state(ts):
    """A copy of ``ts`` on the same devices (what survives when ``ts`` is donated)."""
    return jax.tree.map(jnp.copy, ts)


def _deleted(ts) -> bool:
    return any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree.leaves(ts))


def _replay(run, kept, data, good):
    """Replay ``good`` steps from (a copy of) ``kept``; while the state they give is not finite
    (a non-finite gradient whose loss was finite: with ``grad_norm=False`` the guard sees it a
    step late), one step fewer. ``(ts, flat, good)``."""
    while True:
        ts, flat, _ = run(copy_state(kept), data, np.int32(good))
        if good == 0 or _finite(ts):
            return ts, flat, good
        good -= 1


def _add(a, b):
    return b if a is None else jax.tree.map(np.add, a, b)


class Launch(NamedTuple):
    """A dispatched in-memory epoch: the state it started from (``before``: its params,
    model and optimizer state donated unless launched from a copy; its step and key stay
    readable), ``kept`` (an intact copy of ``before`` for the replay, or ``None``), and the
    runner's outputs ``ts``, ``flat`` (packed report) and ``nxt`` (the next epoch's limit)."""

    before: object
    kept: object
    ts: object
    flat: object
    nxt: object


def memory_launch(run_epoch, sizes, ts, data, limit=None, *, keep=False, copy=False):
    """Dispatch one in-memory epoch from ``ts`` (asynchronous) -> :class:`Launch`. ``limit``:
    the step count as an array already on the device (saves a transfer). The runner donates
    its input: ``copy`` launches from a copy (``ts`` stays readable, and is the replay's
    source); ``keep`` keeps a copy for the replay (needed where the guard may see a non-finite
    gradient a step late: ``grad_norm=False``)."""
    src = copy_state(ts) if copy else ts
    kept = ts if copy else (copy_state(ts) if keep else None)
    new, flat, nxt = run_epoch(src, data, np.int32(len(sizes)) if limit is None else limit)
    return Launch(ts, kept, new, flat, nxt)


def memory_finish(run_epoch, sizes, launched, data, bad_inputs, last=None):
    """Wait for a launched epoch: ``(train_state, Report, Bad | None)``. The epoch itself
    stops before a non-finite step, keeping the state from before it; when that state is
    still not finite (a NaN gradient with a finite loss, seen a step late) and a copy was
    kept, replay the epoch up to the last finite state. ``last``: the latest epoch launched
    after this one (a state donated onward is taken from it: those epochs ran no step).
    ``bad_inputs(before, index) -> bool``: whether that batch's inputs are all finite."""
    report = run_epoch.unpack(launched.flat)                  # one transfer, one wait
    if not report.bad:
        return launched.ts, report, None
    ts, good = launched.ts, report.steps - 1
    if _deleted(ts) and last is not None:
        ts = last.ts._replace(step=ts.step, key=ts.key)
    if not _finite(ts) and launched.kept is not None and good > 0:
        ts, flat, good = _replay(run_epoch, launched.kept, data, good - 1)
        report = run_epoch.unpack(flat)
    before = launched.before
    return ts, report._replace(steps=good), Bad(int(before.step) + good, good,
                                                bad_inputs(before, good), _finite(ts))


def batch_inputs_finite(data, sizes, shuffle):
    """``bad_inputs`` for :func:`memory_finish` on one device: batch ``index`` of the epoch
    that started from ``before``, gathered on the host."""
    def check(before, index):
        n = jax.tree.leaves(data)[0].shape[0]
        start = sum(sizes[:index])
        idx = np.asarray(batch_order(before, n, shuffle))[start:start + sizes[index]]
        return inputs_finite(jax.tree.map(lambda a: np.asarray(a)[idx], data))
    return check


def stream_epoch(run_chunk, ts, batches, k, check, where):
    """``(train_state, Report or None if no batch came, Bad | None)`` for one streamed epoch.

    Chunk ``j + 1`` is dispatched before chunk ``j``'s report is read, so the device never
    waits for the host; a bad chunk's successor is dropped and the bad one replayed. The
    report's sums are those of the whole epoch."""
    pre = Prefetch(batches, k, check, where)
    total, prev, bad, report = None, None, None, None

    def read(p):
        nonlocal total, bad, report
        report = run_chunk.unpack(p[2][1])
        if report.bad:
            bad = p
        else:
            total = _add(total, report.sums)
    try:
        for chunk in pre:
            res = run_chunk(ts, chunk.stacked, np.int32(chunk.count))[:2]
            if prev is not None:
                read(prev)
                if bad is not None:
                    break
            prev, ts = (ts, chunk, res), res[0]
        else:
            if prev is not None:
                read(prev)
    finally:
        pre.close()
    if report is None:
        return ts, None, None
    if bad is None:
        return ts, report._replace(sums=total), None
    before, chunk, res = bad
    ts, flat, good = _replay(run_chunk, before, chunk.stacked, report.steps - 1)
    report = run_chunk.unpack(flat)._replace(steps=good)
    return ts, report._replace(sums=_add(total, report.sums)), Bad(
        int(before.step) + good, chunk.first + good, inputs_finite(chunk.host[good]),
        _finite(ts))


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
            check(b, f"{where} (batch {i + 1})")
        total = _add(total, jax.device_get(run(params, state, jax.device_put(b))))
    if total is None:
        raise ValueError(f"{where}: the validation data gave no batch")
    lsum, stats, n = total
    return {"val_loss": float(lsum) / float(n),
            **{"val_" + m.name: float(m.result(s)) for m, s in zip(metrics, stats)}}
