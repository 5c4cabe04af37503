"""One epoch of ``fit``: in memory (one compiled call) or streamed (compiled chunks), with the
replay that recovers the last good state after a non-finite step.

:class:`InMemory` and :class:`Streamed` are the two sources of epochs behind one interface
(:class:`Epochs`) (as :mod:`fnn.train.validation`'s two are for validation): ``fit`` runs every
epoch the same way whatever the data is.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fnn.train.data_checks import inputs_finite
from fnn.train.epoch import Runner, batch_order
from fnn.train.launch_thread import Pending, ready
from fnn.train.progress import tick, tick_every
from fnn.train.streaming import Prefetch, epoch_batches


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


@jax.jit
def _copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def copy_state(ts):
    """A copy of ``ts`` on the same devices (what survives when ``ts`` is donated): one
    compiled call for the whole tree (a ``jnp.copy`` per leaf is a dispatch each, which on
    a small model cost more than its epoch's steps)."""
    return _copy_tree(ts)


def _deleted(ts) -> bool:
    return any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree.leaves(ts))


def _replay(run, kept, data, good):
    """Replay ``good`` steps from (a copy of) ``kept``; while the state they give is not finite
    (an update that overflowed from a finite loss and gradient: the guard sees it a step
    late), one step fewer. ``(ts, flat, good)``."""
    while True:
        ts, flat, _ = run(copy_state(kept) if getattr(run, "donates", True) else kept, data,
                          np.int32(good))
        if good == 0 or _finite(ts):
            return ts, flat, good
        good -= 1


def recover(run, kept, data, steps):
    """The last good state of a run of ``steps`` steps from ``kept`` that went bad: replayed
    with ``run.strict()`` (which leaves at the first step whose loss or gradient is not
    finite, keeping the state from before it), then backed off as :func:`_replay` while that
    state is not finite. ``(ts, flat, good)``; ``flat`` is the strict runner's report."""
    strict = run.strict()
    ts, flat, _ = strict(copy_state(kept) if strict.donates else kept, data, np.int32(steps))
    report = strict.unpack(flat)
    good = report.steps - 1 if report.bad else report.steps
    if good == 0 or _finite(ts):
        return ts, flat, good
    return _replay(strict, kept, data, good - 1)


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
    the step count as an array already on the device (saves a transfer). A runner that
    donates its input (``run_epoch.donates``) runs from a copy with ``copy`` (``ts`` stays
    readable, and is the replay's source), and with ``keep`` a copy is kept for the replay
    (where the guard may see a non-finite state a step late: an update that overflowed from
    a finite gradient). A runner that does not donate leaves ``ts`` whole: it is that copy,
    with no copy made."""
    if not getattr(run_epoch, "donates", True):
        src, kept = ts, (ts if keep or copy else None)
    else:
        src = copy_state(ts) if copy else ts
        kept = ts if copy else (copy_state(ts) if keep else None)
    new, flat, nxt = run_epoch(src, data, np.int32(len(sizes)) if limit is None else limit)
    return Launch(ts, kept, new, flat, nxt)


def memory_finish(run_epoch, launched, data, bad_inputs, last=None):
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
    strict = getattr(run_epoch, "strict", lambda: run_epoch)()
    if strict is not run_epoch and launched.kept is not None:     # steps judged by loss only
        ts, flat, good = recover(run_epoch, launched.kept, data, report.steps)
        report = strict.unpack(flat)
    elif not _finite(ts) and launched.kept is not None and good > 0:
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


def stream_epoch(run_chunk, ts, batches, k, check, where, put=jax.device_put):
    """``(train_state, Report or None if no batch came, Bad | None)`` for one streamed epoch.

    Chunk ``j + 1`` is dispatched before chunk ``j``'s report is read, so the device never
    waits for the host; a bad chunk's successor is dropped and the bad one replayed. The
    report's sums are those of the whole epoch."""
    pre = Prefetch(batches, k, check, where, put=put)
    total, prev, bad, report, done = None, None, None, None, 0

    def read(p):
        nonlocal total, bad, report, done
        report = run_chunk.unpack(p[2][1])
        if report.bad:
            bad = p
        else:
            total, done = _add(total, report.sums), done + report.steps
            tick(done, total.loss, total.examples)          # the display, if any
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
    strict = getattr(run_chunk, "strict", lambda: run_chunk)()
    if strict is not run_chunk:                                 # steps judged by loss only
        ts, flat, good = recover(run_chunk, before, chunk.stacked, report.steps)
    else:
        ts, flat, good = _replay(run_chunk, before, chunk.stacked, report.steps - 1)
    report = strict.unpack(flat)._replace(steps=good)
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


# --------------------------------------------------------------------------- epoch sources

class Epochs(Protocol):
    """What ``fit`` asks of its data: ``run(epoch, ts, remaining) -> (ts, Report or None,
    Bad or None)``, ``ahead(ts)`` (launch the next epoch early, where that helps),
    ``restart()`` (a resumed run: forget batches peeked before it) and ``take_time()`` (the
    epoch's time when several were measured together, else ``None``)."""

    def run(self, epoch: int, ts, remaining: int): ...

    def ahead(self, ts): ...

    def restart(self): ...

    def take_time(self): ...


@dataclasses.dataclass
class InMemory:
    """In-memory epochs, each one compiled call (:func:`memory_launch`, :func:`memory_finish`).

    Epochs are launched ahead: the next one before this one's bookkeeping (:meth:`ahead`),
    or, when nothing reads the state between epochs (``quiet``: no validation, callbacks or
    backup), a chain of ``chain`` epochs (about a quarter second of work, see
    :func:`chain_length`) read back after one wait (on XLA:CPU each wait costs about as much
    as a millisecond of work). Launched epochs are used only if the next epoch starts from
    the state they started from. ``keep``: keep each epoch's start for the replay
    (``grad_norm=False``: the runner then does not donate, and the start is that copy);
    ``speculate``: launching ahead is allowed (a small state, copied, or a runner that does
    not donate). A runner that reports its steps (``runner.ticks``) gets ``(limit, every)``,
    ``every`` placed by ``put`` and paced by :func:`fnn.train.progress.tick_every`; its epochs
    run in the call that launches them, so they are not chained but launched ahead one at a
    time from a helper thread (:class:`fnn.train.launch_thread.Pending`)."""

    runner: Runner
    sizes: tuple
    data: tuple
    limit: object
    bad_inputs: Callable
    keep: bool
    speculate: bool
    quiet: bool
    state_bytes: int
    inflight: collections.deque = dataclasses.field(default_factory=collections.deque)
    chain: int = 1
    epoch_time: float | None = None
    put: Callable | None = None
    ended: float | None = None
    every: int = 0

    def __post_init__(self):
        if self.runner.ticks:              # the epoch reports its steps: (limit, every)
            self.every = tick_every(len(self.sizes), None)
            self.limit = (self.limit, self.put(np.int32(self.every)))

    def _pace(self):
        """Steps between in-epoch reports from the time between two epochs' ends."""
        now, last = time.perf_counter(), self.ended
        self.ended = now
        if self.runner.ticks and last is not None:
            every = tick_every(len(self.sizes), now - last)
            if every != self.every:
                self.every, self.limit = every, (self.limit[0], self.put(np.int32(every)))

    def run(self, epoch, ts, remaining):
        out = self._run(epoch, ts, remaining)
        self._pace()
        return out

    def _run(self, epoch, ts, remaining):
        q = self.inflight
        if q and q[0].before is not ts:
            for launched in q:              # from another state: not used (but waited for)
                ready(launched)
            q.clear()
        if not q:
            t0, last, limit = time.perf_counter(), ts, self.limit
            for _ in range(max(1, min(self.chain, remaining))):
                q.append(memory_launch(self.runner, self.sizes, last, self.data, limit,
                                       keep=self.keep))
                last, limit = q[-1].ts, q[-1].nxt
            jax.block_until_ready(q[-1].flat)
            per = (time.perf_counter() - t0) / len(q)
            if len(q) > 1:
                self.epoch_time = per
            if self.quiet and not self.runner.ticks:    # a ticking epoch runs as launched:
                self.chain = chain_length(per, self.state_bytes)   # one at a time, ahead
        out = memory_finish(self.runner, ready(q.popleft()), self.data,
                            self.bad_inputs, ready(q[-1]) if q else None)
        if out[2] is not None:
            q.clear()
        return out

    def ahead(self, ts):
        """Launch the next epoch before this one's bookkeeping (validation read-back, history,
        callbacks), so the device does not wait for the host. The epoch donates its input and
        the bookkeeping reads ``ts``: it runs from a copy, made only for a small state; a
        large one is worth its memory more than the overlap. A runner that reports its steps
        holds a host callback, and XLA:CPU runs such a program in the call that launches it:
        it is launched from a helper thread (:class:`fnn.train.launch_thread.Pending`)."""
        if not self.inflight and self.chain == 1 and self.speculate:
            args = (self.runner, self.sizes, ts, self.data, self.limit)
            if not self.runner.ticks:
                self.inflight.append(memory_launch(*args, copy=True))
            elif Pending.traces_alike():
                self.inflight.append(Pending(ts, memory_launch, *args, copy=True))

    def restart(self):
        for launched in self.inflight:
            ready(launched)
        self.inflight.clear()

    def take_time(self):
        t, self.epoch_time = self.epoch_time, None
        return t


def chain_length(seconds_per_epoch, state_bytes, most=64, seconds=0.25, memory=2 ** 26):
    """Epochs per chain: about ``seconds`` of work (the display stays live), at most ``most``,
    and the chain's states (two per epoch) within ``memory`` bytes."""
    by_time = int(seconds / max(seconds_per_epoch, 1e-6))
    by_memory = int(memory // max(2 * state_bytes, 1))
    return max(1, min(most, by_time, by_memory))


@dataclasses.dataclass
class Streamed:
    """Streamed epochs: the batches of ``source`` for each epoch (at most ``steps_per_epoch``)
    in compiled chunks of ``chunk`` steps (:func:`stream_epoch`), each host batch checked by
    ``check`` and placed by ``put``. ``pending``: epoch 1's batches, the first one already
    read (to build the train state)."""

    runner: Runner
    source: object
    steps_per_epoch: int | None
    chunk: int
    check: Callable | None
    put: Callable
    pending: object = None

    def run(self, epoch, ts, remaining):
        batches = self.pending if epoch == 1 and self.pending is not None else \
            epoch_batches(self.source, epoch, self.steps_per_epoch)
        self.pending = None
        return stream_epoch(self.runner, ts, batches, self.chunk, self.check,
                            "fit: train_data", self.put)

    def ahead(self, ts):
        pass

    def restart(self):
        self.pending = None

    def take_time(self):
        return None
