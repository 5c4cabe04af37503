"""fnn.train.epoch's pieces called directly, with a stand-in step whose every number is worked by
hand (no model): the sums (``_add``, ``zero_sums``), the loop (limits, the non-finite exit, the
in-epoch reports), the packing of the sums by dtype, the :class:`Runner`'s report, next limit and
donation, the learning rate it reads, the end check, ``batch_order`` against the order a real
epoch sees, and ``evaluate`` against NumPy in float64 (a padded last batch included)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnn import losses, optim, train
from fnn.layers import Dense, Dropout, serial
from fnn.precision import loss_scaling
from fnn.train import epoch
from fnn.train.epoch import DONATE, KEEP, Report, Runner, Sums
from fnn.train.step import StepOut

from fake_layers import Scaled

NAN = float("nan")


def _core(ts, b):
    """A stand-in step on a batch ``b = [x, 1]`` (float32): the state adds ``x``; loss ``x``,
    gradient norm ``2x``, 3 examples, finite when ``x`` is; stats ``(b, 1)`` (float32, int32)."""
    x = b[0]
    return ts + x, StepOut(x, jnp.isfinite(x), 2 * x, 3, (b, jnp.ones((), jnp.int32)))


def _sums(s, loss, grad_norm, examples, stats0, stats1):
    np.testing.assert_array_equal([float(s.loss), float(s.grad_norm), float(s.examples)],
                                  [loss, grad_norm, examples])
    np.testing.assert_array_equal(np.asarray(s.stats[0]), stats0)
    assert int(s.stats[1]) == stats1 and s.stats[1].dtype == jnp.int32
    assert s.stats[0].dtype == jnp.float32 and s.stats[0].shape == (2,)
    assert s.loss.dtype == s.grad_norm.dtype == s.examples.dtype == jnp.float64   # x64 on


def test_add_weights_by_the_batch_size():
    acc = Sums(jnp.float64(1.0), jnp.float64(2.0), jnp.float64(3.0),
               (jnp.array([1.0, 2.0], jnp.float32), jnp.int32(4)))
    out = StepOut(jnp.float64(0.5), True, jnp.float64(0.25), 4,
                  (jnp.array([10.0, 20.0], jnp.float32), jnp.int32(1)))
    _sums(epoch._add(acc, out), 1 + 0.5 * 4, 2 + 0.25 * 4, 7, [11, 22], 5)


def test_zero_sums_are_shaped_like_the_steps_outputs():
    z = epoch.zero_sums(_core, jnp.float64(0), jax.ShapeDtypeStruct((2,), jnp.float32))
    _sums(z, 0, 0, 0, [0, 0], 0)
    assert z.loss.shape == z.grad_norm.shape == z.examples.shape == ()


LOOP = jax.jit(lambda ts, s, limit: epoch._loop(_core, ts, s, limit, s.shape[0]))


def _batches(xs):
    """The stacked batches ``[x, 1]`` (float32) for the values ``xs``."""
    return jnp.stack([jnp.asarray(xs, jnp.float32), jnp.ones(len(xs), jnp.float32)], 1)


def _loop(s, limit):
    i, ts, sums, bad = LOOP(jnp.float64(0), _batches(s), np.int32(limit))
    assert i.dtype == jnp.int32 and bad.dtype == jnp.bool_
    return int(i), float(ts), sums, bool(bad)


def test_loop_runs_to_the_limit_and_leaves_before_a_non_finite_step():
    i, ts, s, bad = _loop([1, 2, NAN, 4, 5], 2)           # the limit comes first
    assert (i, ts, bad) == (2, 3.0, False)
    _sums(s, 9, 18, 6, [3, 2], 2)
    i, ts, s, bad = _loop([1, 2, NAN, 4, 5], 10)          # step 3 counted, not applied
    assert (i, ts, bad) == (3, 3.0, True)
    _sums(s, 3 * 3, 3 * 6, 6, [3, 2], 2)
    i, ts, s, bad = _loop([np.inf, 2, 3, 4, 5], 10)
    assert (i, ts, bad) == (1, 0.0, True)
    _sums(s, 0, 0, 0, [0, 0], 0)
    i, ts, s, bad = _loop([1, 2, 3, 4, 5], 10)            # all 5 steps: 1 + ... + 5 = 15
    assert (i, ts, bad) == (5, 15.0, False)
    _sums(s, 3 * 15, 3 * 30, 15, [15, 5], 5)
    i, ts, s, bad = _loop([1, 2, 3, 4, 5], 5)
    assert (i, ts, bad) == (5, 15.0, False)
    i, ts, s, bad = _loop([1, 2, 3, 4, 5], 0)
    assert (i, ts, bad) == (0, 0.0, False)
    _sums(s, 0, 0, 0, [0, 0], 0)


def test_loop_reports_every_k_steps(monkeypatch):
    """Reports between segments of ``every`` steps, never after the last step (the epoch's
    end is reported by the host) nor after a non-finite one; ``every=0``: none."""
    seen = []
    monkeypatch.setattr(epoch, "tick", lambda *a: seen.append(tuple(float(v) for v in a)))
    run = jax.jit(lambda ts, s, limit, every: epoch._loop(_core, ts, s, limit, s.shape[0],
                                                           every))

    def ticks(s, limit, every, want):
        seen.clear()
        i, ts, sums, bad = run(jnp.float64(0), _batches(s), np.int32(limit), np.int32(every))
        jax.effects_barrier()
        assert sorted(seen) == want
        return int(i), float(ts), float(sums.loss), float(sums.examples), bool(bad)

    # (steps done, loss sum = 3 * (1 + ... + steps), examples = 3 * steps); the cases with a
    # non-finite step first (a loop that ran on past its end would stop there)
    assert ticks([1, 2, NAN, 4, 5], 10, 2, [(2, 9, 6)]) == (3, 3, 9, 6, True)
    assert ticks([1, 2, 3, NAN, 5], 10, 2, [(2, 9, 6)]) == (4, 6, 18, 9, True)
    assert ticks([1, 2, 3, 4, 5], 10, 2, [(2, 9, 6), (4, 30, 12)]) == (5, 15, 45, 15, False)
    assert ticks([1, 2, 3, 4, 5], 10, 1, [(1, 3, 3), (2, 9, 6), (3, 18, 9), (4, 30, 12)]) \
        == (5, 15, 45, 15, False)
    assert ticks([1, 2, 3, 4, 5], 10, 4, [(4, 30, 12)]) == (5, 15, 45, 15, False)
    assert ticks([1, 2, 3, 4, 5], 10, 5, []) == (5, 15, 45, 15, False)
    assert ticks([1, 2, 3, 4, 5], 3, 2, [(2, 9, 6)]) == (3, 6, 18, 9, False)
    assert ticks([1, 2, 3, 4, 5], 10, 0, []) == (5, 15, 45, 15, False)


def test_packer_one_vector_per_dtype_in_name_order():
    like = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros((), jnp.float64),
            "c": jnp.zeros((2, 2), jnp.int32), "d": jnp.zeros((), jnp.float32),
            "e": jnp.zeros(3, jnp.float32)}
    pack, unpack = epoch._packer(like)
    tree = {"a": jnp.array([1, 2], jnp.float32), "b": jnp.float64(3),
            "c": jnp.array([[4, 5], [6, 7]], jnp.int32), "d": jnp.float32(8),
            "e": jnp.array([9, 10, 11], jnp.float32)}
    f32, f64, i32 = pack(tree)                 # float32 < float64 < int32, leaves in tree order
    np.testing.assert_array_equal(f32, [1, 2, 8, 9, 10, 11])
    np.testing.assert_array_equal(f64, [3])
    np.testing.assert_array_equal(i32, [4, 5, 6, 7])
    assert (f32.dtype, f64.dtype, i32.dtype) == (jnp.float32, jnp.float64, jnp.int32)
    back = unpack((f32, f64, i32))
    assert sorted(back) == ["a", "b", "c", "d", "e"]
    for k in tree:
        assert back[k].shape == tree[k].shape and back[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(back[k], tree[k])


# --------------------------------------------------------------------------- the runner

def _ts(opt=None, w=(0.0, 0.0)):
    params = {"w": jnp.asarray(w, jnp.float32)}
    opt = optim.sgd(0.1) if opt is None else opt
    return train.TrainState(params, {"m": jnp.zeros(1)}, opt.init(params),
                            jnp.zeros([], jnp.int32), jnp.asarray([5, 6], jnp.uint32))


def _fn(ts, data, limit):
    """A stand-in epoch: ``w += data``, one step, 3 steps reported, bad when ``sum(data) > 10``;
    the sums carry what it was given: loss ``sum(data)``, grad norm ``every`` (-1 without),
    examples ``limit``, stats ``(2 * data, 7)``."""
    limit, every = limit if isinstance(limit, tuple) else (limit, -1)
    new = ts._replace(params={"w": ts.params["w"] + data}, step=ts.step + 1)
    acc = Sums(jnp.sum(data).astype(jnp.float64), jnp.asarray(every, jnp.float64),
               jnp.asarray(limit, jnp.float64), (2 * data, jnp.int32(7)))
    return new, jnp.int32(3), jnp.sum(data) > 10, acc


def test_runner_report_next_limit_and_state():
    run = Runner(_fn)
    assert run.donates is False and run.strict() is run and run.ticks is False
    ts = _ts()
    new, flat, nxt = run(ts, jnp.array([1, 2], jnp.float32), np.int32(4))
    assert isinstance(new, train.TrainState)
    np.testing.assert_array_equal(new.params["w"], [1, 2])
    assert int(new.step) == 1 and new.state is not None
    np.testing.assert_array_equal(new.key, [5, 6])
    np.testing.assert_array_equal(new.state["m"], [0])
    # steps, bad, loss, grad norm, examples, stats (2 + 1), rate, scale: one float64 vector
    assert flat.shape == (10,) and flat.dtype == jnp.float64
    r = run.unpack(flat)
    assert isinstance(r, Report)
    assert (r.steps, r.bad) == (3, False) and type(r.steps) is int and type(r.bad) is bool
    assert (float(r.sums.loss), float(r.sums.grad_norm), float(r.sums.examples)) == (3, -1, 4)
    np.testing.assert_array_equal(r.sums.stats[0], [2, 4])
    assert r.sums.stats[0].dtype == jnp.float32 and r.sums.stats[1].dtype == jnp.int32
    assert int(r.sums.stats[1]) == 7
    assert r.sums.loss.shape == r.sums.examples.shape == r.sums.stats[1].shape == ()
    assert r.sums.stats[0].shape == (2,)
    assert type(r.learning_rate) is float and r.learning_rate == pytest.approx(0.1, rel=1e-6)
    assert type(r.loss_scale) is float and np.isnan(r.loss_scale)
    assert int(nxt) == 4 and nxt.dtype == jnp.int32
    _, flat, nxt = run(ts, jnp.array([5, 6], jnp.float32), np.int32(4))   # sum 11: bad
    assert run.unpack(flat).bad is True and int(nxt) == 0 and nxt.dtype == jnp.int32
    # a Python int limit (int64 under x64): the next limit is int32 all the same, the dtype
    # the next epoch's program was compiled for
    _, _, nxt = run(ts, jnp.array([1, 2], jnp.float32), 4)
    assert int(nxt) == 4 and nxt.dtype == jnp.int32


def test_runner_reads_the_rate_and_the_loss_scale():
    run = Runner(_fn)
    data = jnp.array([1, 2], jnp.float32)
    r = run.unpack(run(_ts(loss_scaling(optim.sgd(0.25), initial=8.0)), data, np.int32(1))[1])
    assert r.loss_scale == 8.0 and r.learning_rate == 0.25
    r = run.unpack(run(_ts(optax.adam(0.3)), data, np.int32(1))[1])
    assert np.isnan(r.learning_rate) and np.isnan(r.loss_scale)
    r = run.unpack(run(_ts(optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)), data,
                       np.int32(1))[1])
    assert r.learning_rate == 0.5


def test_rate_of_each_kind_of_state():
    params = {"w": jnp.zeros(2)}
    assert float(epoch._rate(optim.sgd(0.25).init(params))) == 0.25
    assert float(epoch._rate(optax.inject_hyperparams(optax.sgd)(learning_rate=0.5).init(
        params))) == 0.5
    assert np.isnan(float(epoch._rate(optax.adam(0.3).init(params))))
    assert epoch._rate(optax.adam(0.3).init(params)).shape == ()
    # the first in tree order
    two = (optim.sgd(0.25).init(params), optim.sgd(0.75).init(params))
    assert float(epoch._rate(two)) == 0.25


def test_runner_with_ticks_passes_every_on():
    run = Runner(_fn, ticks=True)
    assert run.ticks is True
    ts, data = _ts(), jnp.array([1, 2], jnp.float32)
    _, flat, nxt = run(ts, data, (np.int32(4), np.int32(2)))
    r = run.unpack(flat)
    assert (float(r.sums.examples), float(r.sums.grad_norm)) == (4, 2)
    assert isinstance(nxt, tuple) and (int(nxt[0]), int(nxt[1])) == (4, 2)
    _, flat, nxt = run(ts, data, np.int32(3))             # a replay: no reports
    r = run.unpack(flat)
    assert (float(r.sums.examples), float(r.sums.grad_norm)) == (3, 0)
    assert (int(nxt[0]), int(nxt[1])) == (3, 0)
    _, flat, nxt = run(ts, jnp.array([5, 6], jnp.float32), (np.int32(4), np.int32(2)))
    assert run.unpack(flat).bad and (int(nxt[0]), int(nxt[1])) == (0, 2)


def test_runner_donation():
    """DONATE: the params, model and optimizer state given are consumed, step and key stay
    readable; KEEP and jax.jit leave everything whole."""
    assert Runner(_fn, DONATE).donates is True
    assert Runner(_fn, KEEP).donates is False
    assert Runner(_fn, functools.partial(jax.jit, donate_argnums=())).donates is False
    data = jnp.array([1, 2], jnp.float32)
    ts = _ts()
    new, _, _ = Runner(_fn, DONATE)(ts, data, np.int32(1))
    assert all(a.is_deleted() for a in jax.tree.leaves((ts.params, ts.state, ts.opt_state)))
    assert not ts.step.is_deleted() and not ts.key.is_deleted()
    np.testing.assert_array_equal(new.params["w"], [1, 2])
    ts = _ts()
    Runner(_fn, KEEP)(ts, data, np.int32(1))
    assert not any(a.is_deleted() for a in jax.tree.leaves(ts))


def test_split_join_and_end_check():
    ts = _ts()
    big, small = epoch.split(ts)
    assert big == (ts.params, ts.state, ts.opt_state) and small == (ts.step, ts.key)
    back = epoch.join(big, small)
    assert isinstance(back, train.TrainState) and back == ts
    f, t = jnp.asarray(False), jnp.asarray(True)
    assert not bool(epoch._end_check(ts, f)) and bool(epoch._end_check(ts, t))
    assert bool(epoch._end_check(_ts(w=(0.0, NAN)), f))                     # params
    nan_rate = ts._replace(opt_state=jax.tree.map(lambda a: a * NAN, ts.opt_state))
    assert bool(epoch._end_check(nan_rate, f))                              # optimizer state
    assert not bool(epoch._end_check(ts._replace(state={"m": jnp.array([NAN])}), f))


# --------------------------------------------------------------------------- batch order

def test_batch_order_is_the_order_an_epoch_sees():
    """7 examples (x = 0..6) in batches 3, 3, 1: an augment function records each batch the
    compiled epoch trains on; their concatenation is batch_order's."""
    seen = []

    def augment(key, x, t):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)[:, 0].tolist()), x,
                           ordered=True)
        return x, t
    model = Dense(1)
    n = 7
    x = jnp.arange(n, dtype=jnp.float64)[:, None]
    ts = train.create_train_state(model, optim.sgd(0.0), jax.random.PRNGKey(4), (3, 1))
    order = np.asarray(epoch.batch_order(ts, n, True))
    assert sorted(order.tolist()) == list(range(n)) and order.tolist() != list(range(n))
    run, sizes = epoch.make_epoch_runner(model, losses.mse, optim.sgd(0.0).update, "autodiff",
                                         (), None, False, augment, n, 3, False, True, None,
                                         jax.jit)
    assert sizes == (3, 3, 1)
    run(ts, (x, x, {}), np.int32(3))
    jax.effects_barrier()
    assert [v for b in seen for v in b] == order.tolist()
    assert [len(b) for b in seen] == [3, 3, 1]
    np.testing.assert_array_equal(epoch.batch_order(ts, n, False), np.arange(n))


# --------------------------------------------------------------------------- evaluate

def test_evaluate_against_numpy():
    """Dense(3) then dropout (off in eval mode), 5 examples: batches of 3 (the last padded with
    a weight-0 copy), of 256 (one batch of 5) and of 1 all give the float64 NumPy mean."""
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), rng.normal(size=3)
    y = np.array([0, 2, 1, 1, 0])
    z = x @ w + b
    ce = np.log(np.sum(np.exp(z), 1)) - z[np.arange(5), y]
    want = {"loss": ce.mean(), "accuracy": np.mean(np.argmax(z, 1) == y)}
    assert 0 < want["accuracy"] < 1
    model = serial(Dense(3), Dropout(0.5))
    params = {"0": {"w": jnp.asarray(w), "b": jnp.asarray(b)}, "1": {}}
    loss = losses.softmax_cross_entropy_with_integer_labels
    for bs in (3, 256, 1):
        got = train.evaluate(model, loss, params, {"0": {}, "1": {}}, (x, y), batch_size=bs)
        assert sorted(got) == ["accuracy", "loss"] and all(type(v) is float for v in got.values())
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-12)
        np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=1e-12)
    got = train.evaluate(model, loss, params, {"0": {}, "1": {}}, (x, y), batch_size=3,
                         metrics=())
    assert list(got) == ["loss"]
    # the model's keywords (the data's third element) reach apply, padded rows included
    scale = np.array([1.0, -2.0, 0.5, 3.0, -1.0])
    zs = z * scale[:, None]
    ce_s = np.log(np.sum(np.exp(zs), 1)) - zs[np.arange(5), y]
    got = train.evaluate(Scaled(), loss, {}, {}, (z, y, {"scale": scale}), batch_size=3)
    np.testing.assert_allclose(got["loss"], ce_s.mean(), rtol=1e-12)
    np.testing.assert_allclose(got["accuracy"], np.mean(np.argmax(zs, 1) == y), rtol=1e-12)
    with pytest.raises(ValueError, match=r"^evaluate: data has 0 examples$"):
        train.evaluate(model, loss, params, {}, (x[:0], y[:0]))
    with pytest.raises(Exception, match=r"^evaluate: "):
        train.evaluate(model, loss, params, {}, {"x": x, "y": y})
    with pytest.raises(ValueError, match=r"^evaluate: precision='bfloat17': "):
        train.evaluate(model, loss, params, {"0": {}, "1": {}}, (x, y), precision="bfloat17")
