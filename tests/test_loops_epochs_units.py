"""fnn.train.loops' epoch sources with a stand-in runner (tests/fake_runner.py): a streamed
epoch in chunks (sums, reports, the replay of a bad chunk), :class:`InMemory` (one epoch per
call, chains of epochs when nothing reads the state between them, an epoch launched ahead,
the pace of in-epoch reports) and :class:`Streamed` (which batches each epoch reads). The
chain length and the report pace are set by hand (monkeypatched), not measured."""
import jax
import numpy as np

BIG = 3e38                       # twice it overflows float32
B32 = float(np.float32(BIG))
import pytest

from fnn.train import loops

from fake_runner import BareRunner, FakeRunner, rows, state, sums


def _batches(*pairs):
    return [(np.asarray([p], np.float32), np.zeros(1, np.float32)) for p in pairs]


def _stream(run, pairs, k=2, ts=None, monkeypatch=None):
    ticks, checked, placed = [], [], []
    if monkeypatch is not None:
        monkeypatch.setattr(loops, "tick", lambda *a: ticks.append(tuple(float(v) for v in a)))

    def put(x):
        placed.append(x)
        return jax.device_put(x)
    out = loops.stream_epoch(run, state(step=5) if ts is None else ts, iter(_batches(*pairs)),
                             k, lambda b, where: checked.append(where), "W", put)
    return out, ticks, checked, placed


def test_stream_epoch_sums_every_chunk_and_reports_each(monkeypatch):
    run = FakeRunner()
    (ts, report, bad), ticks, checked, placed = _stream(
        run, [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)], monkeypatch=monkeypatch)
    assert bad is None and float(ts.params["w"]) == 5.0 and int(ts.step) == 10
    assert report.sums == sums(30, 10, 10, 5)
    assert ticks == [(2, 6, 4), (4, 20, 8), (5, 30, 10)]
    assert checked == [f"W (batch {i} of the epoch)" for i in range(1, 6)]
    assert len(placed) == 3 and [int(limit) for _, limit in run.calls] == [2, 2, 1]
    assert [float(t.params["w"]) for t, _ in run.calls] == [0, 2, 4]
    (ts, report, bad), ticks, _, _ = _stream(run, [], monkeypatch=monkeypatch)
    assert (report, bad, ticks, int(ts.step)) == (None, None, [], 5)
    (ts, report, bad), _, _, _ = _stream(run, [(1, 1)], monkeypatch=monkeypatch)
    assert report.sums == sums(2, 2, 2, 1) and bad is None


def test_stream_epoch_replays_the_bad_chunk(monkeypatch):
    run = FakeRunner()                     # a chunk runner does not donate: replayed from its start
    pairs = [(1, 1), (1, 1), (1, 1), (np.nan, 1), (1, 1), (1, 1)]
    (ts, report, bad), ticks, _, _ = _stream(run, pairs, monkeypatch=monkeypatch)
    assert float(ts.params["w"]) == 3.0 and report.steps == 1
    assert report.sums == sums(6, 6, 6, 3)                  # the first chunk and one step
    assert bad == loops.Bad(8, 3, False, True) and ticks == [(2, 4, 4)]
    assert [int(limit) for _, limit in run.calls] == [2, 2, 2, 1]    # the 3rd chunk dropped
    replayed = run.calls[-1][0]
    assert replayed is run.calls[1][0] and float(replayed.params["w"]) == 2.0


def test_stream_epoch_recovers_with_the_strict_runner(monkeypatch):
    strict = FakeRunner(strict=True)
    run = FakeRunner(strict=False, strict_runner=strict)
    pairs = [(1, 1), (1, np.nan), (1, 1), (1, 1)]
    (ts, report, bad), ticks, _, _ = _stream(run, pairs, k=4, monkeypatch=monkeypatch)
    assert float(ts.params["w"]) == 1.0 and report.steps == 1
    assert report.sums == sums(2, 2, 2, 1) and ticks == []
    assert bad == loops.Bad(6, 1, False, True)
    assert [int(limit) for _, limit in strict.calls] == [3]


def test_stream_epoch_bad_from_its_start_and_a_bare_runner(monkeypatch):
    (ts, report, bad), _, _, _ = _stream(FakeRunner(), [(1, 1)], ts=state(np.inf, step=3),
                                         monkeypatch=monkeypatch)
    assert bad == loops.Bad(3, 0, True, False) and report.steps == 0
    bare = BareRunner()                   # no strict(): itself; no donates: replayed from a copy
    (ts, report, bad), _, _, _ = _stream(bare, [(1, 1), (np.nan, 1)], monkeypatch=monkeypatch)
    assert bad == loops.Bad(6, 1, False, True) and float(ts.params["w"]) == 1.0
    assert [int(n) for _, n in bare.calls] == [2, 1] and bare.calls[1][0] is not bare.calls[0][0]


class _Clock:
    """``perf_counter`` stand-in: 1, 2, 3, ... (one second per reading)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


def _memory(run, n=2, **kw):
    args = dict(runner=run, sizes=(1,) * n, data=rows(*[(1, 1)] * n), limit=np.int32(n),
                bad_inputs=lambda before, i: True, keep=False, speculate=False, quiet=False,
                state_bytes=8)
    return loops.InMemory(**{**args, **kw})


def test_in_memory_runs_one_epoch_per_call_when_the_state_is_read():
    run = FakeRunner()
    epochs = _memory(run)
    ts, report, bad = epochs.run(1, state(), 5)
    assert (float(ts.params["w"]), report.steps, bad) == (2.0, 2, None)
    assert epochs.chain == 1 and epochs.take_time() is None and len(run.calls) == 1
    assert int(run.calls[0][1]) == 2 and not epochs.inflight
    ts, report, bad = _memory(FakeRunner(), data=rows((1, 1), (np.nan, 1))).run(1, state(), 5)
    assert bad == loops.Bad(1, 1, True, True) and report.steps == 1


def test_in_memory_chains_quiet_epochs(monkeypatch):
    seen = []
    monkeypatch.setattr(loops, "chain_length", lambda per, b: seen.append((per, b)) or 3)
    monkeypatch.setattr(loops, "time", _Clock())        # each timed span: one second
    run = FakeRunner()
    epochs = _memory(run, quiet=True)
    ts, *_ = epochs.run(1, state(), 9)
    assert epochs.chain == 3 and len(run.calls) == 1 and seen == [(1.0, 8)]
    assert epochs.take_time() is None
    ts, *_ = epochs.run(2, ts, 9)
    assert len(run.calls) == 4 and float(ts.params["w"]) == 4.0 and seen[1] == (1 / 3, 8)
    assert [float(t.params["w"]) for t, _ in run.calls[1:]] == [2, 4, 6]
    assert epochs.take_time() == 1 / 3 and epochs.take_time() is None
    for e in (3, 4):
        ts, *_ = epochs.run(e, ts, 9)
    assert len(run.calls) == 4 and float(ts.params["w"]) == 8.0 and not epochs.inflight
    ts, *_ = epochs.run(5, ts, 2)                     # two epochs left: a chain of two
    assert len(run.calls) == 6 and len(epochs.inflight) == 1 and epochs.take_time() == 0.5
    waited, real_ready = [], loops.ready
    monkeypatch.setattr(loops, "ready", lambda x: waited.append(x) or real_ready(x))
    dropped = epochs.inflight[0]
    other = state(100.0)                              # not the state launched from
    ts, *_ = epochs.run(6, other, 1)
    assert len(run.calls) == 7 and run.calls[-1][0] is other and float(ts.params["w"]) == 102
    assert waited[0] is dropped
    ts, *_ = epochs.run(7, ts, 0)
    assert len(run.calls) == 8


def test_in_memory_chain_is_dropped_after_a_bad_epoch(monkeypatch):
    monkeypatch.setattr(loops, "chain_length", lambda per, b: 3)
    run = FakeRunner(donates=True)
    epochs = _memory(run, quiet=True, data=rows((1, 1), (1, 1)))
    ts, *_ = epochs.run(1, state(), 9)
    epochs.data = rows((1, 1), (np.nan, 1))
    ts, report, bad = epochs.run(2, ts, 9)             # epochs 2 and 3 ran from a donated state
    assert bad == loops.Bad(3, 1, True, True) and not epochs.inflight
    assert [int(n) for _, n in run.calls] == [2, 2, 0, 0] and float(ts.params["w"]) == 3.0


def test_in_memory_keeps_a_copy_for_the_replay_when_asked():
    data = rows((0, 1), (0, BIG), (0, BIG), (2, 1))
    for keep, w in [(True, B32), (False, np.inf)]:
        run = FakeRunner(donates=True)
        ts, report, bad = _memory(run, n=4, data=data, keep=keep).run(1, state(), 9)
        assert float(ts.params["w"]) == w and bad.params_finite == keep
        assert len(run.calls) == (2 if keep else 1)


def test_in_memory_launches_ahead_from_a_copy(monkeypatch):
    run = FakeRunner(donates=True)
    epochs = _memory(run, speculate=True)
    ts = state()
    epochs.ahead(ts)
    epochs.ahead(ts)                                   # one ahead at most
    assert len(run.calls) == 1 and run.calls[0][0] is not ts and not loops._deleted(ts)
    new, *_ = epochs.run(1, ts, 5)
    assert len(run.calls) == 1 and float(new.params["w"]) == 2.0
    for kw in (dict(speculate=False), dict(speculate=True, chain=2)):
        lazy = _memory(FakeRunner(), **kw)
        lazy.ahead(ts)
        assert not lazy.inflight and lazy.runner.calls == []
    epochs.ahead(new)
    waited, real_ready = [], loops.ready
    monkeypatch.setattr(loops, "ready", lambda x: waited.append(x) or real_ready(x))
    launched = epochs.inflight[0]
    epochs.restart()
    assert waited == [launched] and not epochs.inflight and epochs.take_time() is None


def test_in_memory_paces_the_reports_of_a_ticking_runner(monkeypatch):
    placed = []
    run = FakeRunner(ticks=True)
    epochs = _memory(run, n=40, put=lambda v: placed.append(int(v)) or f"every {int(v)}",
                     quiet=True)
    assert epochs.every == 2 and epochs.limit == (40, "every 2") and placed == [2]
    paced = []
    monkeypatch.setattr(loops, "tick_every", lambda n, s: paced.append((n, s)) or 5)
    monkeypatch.setattr(loops, "time", _Clock())
    ts, *_ = epochs.run(1, state(), 9)                 # clock: 1, 2 timing it, 3 its end
    assert paced == [] and run.calls[0][1] == (40, "every 2") and epochs.chain == 1
    ts, *_ = epochs.run(2, ts, 9)                      # 4, 5, then 6: 3 s after the last end
    assert paced == [(40, 3.0)] and epochs.every == 5
    assert epochs.limit == (40, "every 5") and placed == [2, 5]
    epochs.run(3, ts, 9)
    assert placed == [2, 5] and len(run.calls) == 3 and epochs.chain == 1
    ahead = _memory(FakeRunner(ticks=True, donates=True), speculate=True, put=lambda v: int(v))
    ts = state()
    ahead.ahead(ts)                                    # from the helper thread, from a copy
    assert isinstance(ahead.inflight[0], loops.Pending)
    new, *_ = ahead.run(1, ts, 5)
    assert len(ahead.runner.calls) == 1 and ahead.runner.calls[0][0] is not ts
    assert float(new.params["w"]) == 2.0 and not ahead.inflight and not loops._deleted(ts)


def test_in_memory_without_ticks_keeps_its_limit():
    epochs = _memory(FakeRunner(), n=40, put=lambda v: pytest.fail("nothing to place"))
    assert epochs.every == 0 and int(epochs.limit) == 40
    epochs.run(1, state(), 9)
    epochs.run(2, state(), 9)
    assert epochs.every == 0 and int(epochs.limit) == 40


def test_streamed_reads_the_pending_batches_then_each_epochs():
    asked = []

    def source(epoch):
        asked.append(epoch)
        return iter(_batches(*[(epoch, 1)] * 3))
    checked, placed = [], []
    run = FakeRunner()
    epochs = loops.Streamed(run, source, 2, 4, lambda b, where: checked.append(where),
                            lambda x: placed.append(x) or jax.device_put(x),
                            pending=iter(_batches((7, 1))))
    ts, report, bad = epochs.run(1, state(), 3)
    assert asked == [] and report.sums == sums(14, 2, 2, 1) and epochs.pending is None
    assert checked == ["fit: train_data (batch 1 of the epoch)"] and len(placed) == 1
    ts, report, bad = epochs.run(2, ts, 2)              # at most 2 steps of 3 batches
    assert asked == [2] and report.sums == sums(8, 4, 4, 2) and bad is None
    epochs.pending = iter(_batches((9, 1)))
    epochs.restart()
    ts, report, _ = epochs.run(1, ts, 1)
    assert asked == [2, 1] and report.sums == sums(4, 4, 4, 2)
    assert epochs.ahead(ts) is None and epochs.take_time() is None
    every = loops.Streamed(run, source, None, 4, None, jax.device_put)
    assert every.run(3, ts, 1)[1].sums == sums(18, 6, 6, 3)
