"""fnn.train.loops' functions called directly with a stand-in runner whose every number is
worked on the host (tests/fake_runner.py): the finite check, the copies, the replay and the
recovery after a non-finite step, the launch and finish of an in-memory epoch, a streamed
epoch, the inputs check of a bad batch, the history's means and the chain length."""
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.train import loops
from fnn.train.epoch import batch_order

from fake_runner import BareRunner, FakeRunner, rows, state, sums

BIG = 3e38                       # twice it overflows float32
B32 = float(np.float32(BIG))


def _w(ts):
    return float(ts.params["w"])


def test_finite_reads_the_params_and_the_optimizer_state_only():
    ts = state(1.0)
    assert loops._finite(ts)
    assert not loops._finite(ts._replace(params={"w": jnp.array([1.0, np.nan, 2.0])}))
    assert not loops._finite(ts._replace(opt_state=(jnp.array([np.inf, 0.0]),)))
    assert loops._finite(ts._replace(state={"s": jnp.array(np.nan)},
                                     opt_state=(jnp.int32(3), jnp.float32(1))))


def test_copy_state_survives_its_source_and_deleted_is_seen():
    ts = state(2.0, step=3)
    copy = loops.copy_state(ts)
    for a in jax.tree.leaves(ts):
        a.delete()
    assert loops._deleted(ts) and not loops._deleted(copy)
    assert _w(copy) == 2.0 and int(copy.step) == 3
    assert not loops._deleted({"a": 1.0, "b": np.zeros(2)})


def test_add_sums_leafwise_starting_from_none():
    a = sums(1, 2, 3, 4)
    assert loops._add(None, a) is a
    assert loops._add(a, sums(10, 20, 30, 40)) == sums(11, 22, 33, 44)


def test_logs_from_sums_means_per_example():
    metric = SimpleNamespace(name="acc", result=lambda s: s / 4)
    got = loops.logs_from_sums(sums(10, 6, 4, 3), [metric], True, "val_")
    assert got == {"val_loss": 2.5, "val_acc": 0.75, "grad_norm": 1.5}
    assert loops.logs_from_sums(sums(10, 6, 4, 3), [], False) == {"loss": 2.5}
    for s in (None, sums(0, 0, 0, 0)):
        got = loops.logs_from_sums(s, [metric], True)
        assert list(got) == ["loss", "acc", "grad_norm"]
        assert all(math.isnan(v) for v in got.values())


def test_chain_length_by_time_memory_and_cap():
    assert loops.chain_length(0.125, 1) == 2                      # 0.25 s of work
    assert loops.chain_length(0.25 / 3, 1) == 3
    assert loops.chain_length(0.0, 1) == 64                       # the cap
    assert loops.chain_length(1e-3, 2 ** 22) == 8                 # 2 states of 4 MiB each
    assert loops.chain_length(1e-3, 2 ** 22 + 1) == 7
    assert loops.chain_length(1e-3, 0) == 64
    assert loops.chain_length(1e-3, 0, memory=3) == 3              # no state: memory // 1
    assert loops.chain_length(10.0, 1) == 1 and loops.chain_length(1e-3, 2 ** 30) == 1
    assert loops.chain_length(0.5, 1, most=9, seconds=2.0, memory=100) == 4
    assert loops.chain_length(0.01, 10, most=9, seconds=2.0, memory=100) == 5


@pytest.mark.parametrize("donates", [False, True])
def test_replay_backs_off_until_the_state_is_finite(donates):
    run, kept = FakeRunner(strict=False, donates=donates), state(0.0)
    data = rows((0, 1), (0, BIG), (0, BIG), (0, 1))
    ts, flat, good = loops._replay(run, kept, data, 3)           # w: 1, 3e38, inf
    assert (good, _w(ts), flat.steps) == (2, np.float32(1 + np.float32(BIG)), 2)
    assert [int(limit) for _, limit in run.calls] == [3, 2]
    assert all((given is kept) != donates for given, _ in run.calls)
    assert not loops._deleted(kept)
    ts, _, good = loops._replay(run, state(np.nan), data, 0)      # nothing to replay
    assert good == 0 and math.isnan(_w(ts))


@pytest.mark.parametrize("donates", [False, True])
def test_recover_replays_strictly_then_backs_off(donates):
    strict = FakeRunner(strict=True, donates=donates)
    run = FakeRunner(strict=False, strict_runner=strict)
    kept = state(0.0)
    # a NaN update with a finite loss: the strict runner stops before it
    ts, flat, good = loops.recover(run, kept, rows((0, 1), (0, np.nan), (0, 1)), 3)
    assert (good, _w(ts), flat.steps, flat.bad) == (1, 1.0, 2, True)
    assert int(strict.calls[0][1]) == 3 and (strict.calls[0][0] is kept) != donates
    assert run.calls == [] and not loops._deleted(kept)
    # an overflow from finite numbers: the state is bad a step before a step is
    strict.calls.clear()
    data = rows((0, 1), (0, BIG), (0, BIG), (0, 1))
    ts, flat, good = loops.recover(run, kept, data, 4)
    assert (good, flat.steps, flat.bad) == (2, 2, False) and np.isfinite(_w(ts))
    assert [int(limit) for _, limit in strict.calls] == [4, 2]
    ts, flat, good = loops.recover(run, kept, data, 2)            # all good: nothing dropped
    assert (good, flat.steps, flat.bad) == (2, 2, False)
    ts, flat, good = loops.recover(run, kept, rows((np.nan, 1)), 1)
    assert (good, _w(ts), flat.steps) == (0, 0.0, 1)
    ts, flat, good = loops.recover(run, state(np.inf), rows((0, 1)), 1)   # bad from the start
    assert (good, flat.steps) == (0, 1) and math.isinf(_w(ts))
    strict.calls.clear()                       # one good step that overflowed: backed off to 0
    ts, flat, good = loops.recover(run, state(BIG), rows((0, BIG), (0, 1)), 2)
    assert (good, _w(ts)) == (0, B32) and [int(n) for _, n in strict.calls] == [2, 0]


def test_memory_launch_copies_as_the_runner_needs():
    data = rows((0, 1), (0, 2))
    plain = FakeRunner(donates=False)
    for keep, copy, kept in [(False, False, None), (True, False, "ts"), (False, True, "ts")]:
        ts = state()
        launch = loops.memory_launch(plain, (1, 1), ts, data, keep=keep, copy=copy)
        assert plain.calls[-1][0] is ts and int(plain.calls[-1][1]) == 2
        assert launch.before is ts and launch.kept is (ts if kept else None)
        assert (_w(launch.ts), launch.flat.steps, int(launch.nxt)) == (3.0, 2, 2)
    donating = FakeRunner(donates=True)
    ts = state()
    launch = loops.memory_launch(donating, (1, 1), ts, data, jnp.int32(1), copy=True)
    assert donating.calls[-1][0] is not ts and not loops._deleted(ts)
    assert launch.kept is ts and int(donating.calls[-1][1]) == 1 and _w(launch.ts) == 1.0
    ts = state(5.0)
    launch = loops.memory_launch(donating, (1, 1), ts, data, keep=True)
    assert donating.calls[-1][0] is ts and loops._deleted(ts)
    assert launch.kept is not ts and not loops._deleted(launch.kept) and _w(launch.kept) == 5.0
    launch = loops.memory_launch(donating, (1, 1), state(), data)
    assert launch.kept is None


def _finish(run, ts, data, keep=True, last=None):
    seen = []
    launch = loops.memory_launch(run, (1,) * len(data[0]), ts, data, keep=keep)
    out = loops.memory_finish(run, launch, data,
                              lambda before, i: seen.append((before, i)) or i != 1, last)
    return out, seen, launch


def test_memory_finish_good_epoch_and_bad_step():
    run = FakeRunner()
    (ts, report, bad), seen, launch = _finish(run, state(), rows((1, 1), (3, 2)))
    assert ts is launch.ts and bad is None and seen == [] and report == launch.flat
    data = rows((1, 1), (3, 2), (np.nan, 1), (0, 1))
    (ts, report, bad), seen, launch = _finish(run, state(step=10), data)
    assert _w(ts) == 3.0 and report.steps == 2 and report.sums == sums(8, 6, 4, 2)
    assert bad == loops.Bad(12, 2, True, True) and seen == [(launch.before, 2)]


def test_memory_finish_replays_a_state_that_went_bad_a_step_late():
    data = rows((0, 1), (0, BIG), (0, BIG), (2, 1))
    run = FakeRunner()
    (ts, report, bad), seen, launch = _finish(run, state(step=4), data)
    assert [int(n) for _, n in run.calls] == [4, 2]              # the epoch, one replay
    assert np.isfinite(_w(ts)) and report.steps == 2 and report.sums == sums(0, 2 + 2 * B32, 4, 2)
    assert bad == loops.Bad(6, 2, True, True) and seen == [(launch.before, 2)]
    (ts, report, bad), _, _ = _finish(FakeRunner(), state(step=4), data, keep=False)
    assert math.isinf(_w(ts)) and report.steps == 3 and bad == loops.Bad(7, 3, True, False)
    (ts, report, bad), _, _ = _finish(FakeRunner(), state(np.inf), rows((0, 1)))  # no step
    assert math.isinf(_w(ts)) and report.steps == 0 and bad == loops.Bad(0, 0, True, False)
    (ts, report, bad), _, _ = _finish(FakeRunner(), state(BIG), rows((0, BIG), (0, 1)))
    assert _w(ts) == B32 and report.steps == 0 and bad == loops.Bad(0, 0, True, True)


def test_memory_finish_takes_the_state_from_the_last_launch_only_when_donated():
    run = FakeRunner()
    data = rows((1, 1), (np.nan, 1))
    first = loops.memory_launch(run, (1, 1), state(), data)
    later = loops.memory_launch(run, (1, 1), state(50.0), data)
    ts, _, bad = loops.memory_finish(run, first, data, lambda b, i: True, later)
    assert ts is first.ts and _w(ts) == 1.0 and bad == loops.Bad(1, 1, True, True)


def test_a_runner_without_donates_or_strict_is_taken_as_donating_and_strict():
    bare, data = BareRunner(), rows((0, 1), (0, BIG), (0, BIG), (2, 1))
    kept = state()
    ts, _, good = loops._replay(bare, kept, data, 3)
    assert good == 2 and all(given is not kept for given, _ in bare.calls)
    launch = loops.memory_launch(bare, (1,) * 4, kept, data, keep=True)
    assert bare.calls[-1][0] is kept and launch.kept is not kept and _w(launch.kept) == 0.0
    ts, report, bad = loops.memory_finish(bare, launch, data, lambda b, i: True)
    assert (_w(ts), report.steps, bad) == (B32, 2, loops.Bad(2, 2, True, True))


def test_memory_finish_recovers_with_the_strict_runner():
    strict = FakeRunner(strict=True)
    run = FakeRunner(strict=False, strict_runner=strict)
    data = rows((1, 1), (1, np.nan), (1, 1), (1, 1))
    (ts, report, bad), seen, launch = _finish(run, state(step=7), data)
    assert _w(ts) == 1.0 and report.steps == 1 and report.sums == sums(2, 2, 2, 1)
    assert bad == loops.Bad(8, 1, False, True) and seen == [(launch.before, 1)]
    assert len(strict.calls) == 1
    (ts, report, bad), _, _ = _finish(run, state(step=7), data, keep=False)  # no copy: as is
    assert math.isnan(_w(ts)) and report.steps == 2 and bad == loops.Bad(9, 2, True, False)


def test_memory_finish_takes_a_donated_state_from_the_last_launch():
    run = FakeRunner(donates=True)
    data = rows((1, 1), (np.nan, 1))
    ts0 = state(step=2, key=5)
    first = loops.memory_launch(run, (1, 1), ts0, data)
    run.calls.clear()
    ts1 = first.ts
    later = loops.memory_launch(run, (1, 1), ts1, data, first.nxt)    # limit 0: no step
    assert int(run.calls[0][1]) == 0 and loops._deleted(ts1)
    ts, report, bad = loops.memory_finish(run, first, data, lambda b, i: True, later)
    assert ts.params is later.ts.params and _w(ts) == 1.0
    assert (int(ts.step), np.asarray(ts.key).tolist()) == (3, [0, 7])   # not later's 8
    assert bad == loops.Bad(3, 1, True, True)


def test_batch_inputs_finite_checks_the_batch_the_epoch_saw():
    x = np.arange(10.0, dtype=np.float32).reshape(5, 2)
    x[3, 1] = np.nan
    data = (jnp.asarray(x), jnp.zeros(5), {})
    sizes = (2, 2, 1)
    before = state(key=7)
    for shuffle in (False, True):
        order = np.asarray(batch_order(before, 5, shuffle))
        check = loops.batch_inputs_finite(data, sizes, shuffle)
        starts = np.cumsum((0,) + sizes)
        for i in range(3):
            want = bool(np.all(np.isfinite(x[order[starts[i]:starts[i + 1]]])))
            assert check(before, i) == want, (shuffle, i)
    assert not loops.batch_inputs_finite(data, sizes, False)(before, 1)
    assert [loops.batch_inputs_finite(data, (4, 1), False)(before, i) for i in (0, 1)] == \
        [False, True]
