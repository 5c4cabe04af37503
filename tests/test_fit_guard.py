"""fit's non-finite guard: a NaN or Inf loss or gradient stops the epoch at the last finite
state (against plain SGD up to the bad batch), the message names the epoch, the step and
whether the inputs were at fault, and non-finite data is refused before training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_trees_close, xor_data

from fnn import losses, optim, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))
STATE = MODEL.init(jax.random.PRNGKey(0), (1, 2))[1]
SGD = optax.sgd(0.1)


def _start(model, optimizer, key, params, batch=(16, 2)):
    return train.create_train_state(model, optimizer, key, batch, params=params)


def _plain_sgd(params, x, y, lr, epochs, objective, batch=16):
    """Plain optax SGD over x[0:16], x[16:32], ... each epoch."""
    opt = optax.sgd(lr)
    s = opt.init(params)
    vg = jax.jit(jax.grad(objective))
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            g = vg(params, x[i:i + batch], y[i:i + batch], None)
            u, s = opt.update(g, s, params)
            params = optax.apply_updates(params, u)
    return params


def test_nonfinite_inputs_are_reported_as_a_data_problem(key):
    x, y = xor_data(40)
    with pytest.raises(ValueError, match=r"fit: train_data: x holds 1 non-finite value\(s\) "
                                         r"\(NaN or Inf\), the first in example 7: the data, "
                                         r"not the model, is at fault"):
        train.fit(MODEL, CE, optim.sgd(0.1), (x.at[7, 1].set(jnp.nan), y), epochs=1,
                  batch_size=16, key=key)
    with pytest.raises(ValueError, match=r"fit: val_data: x holds 2 non-finite .* example 3"):
        train.fit(MODEL, CE, optim.sgd(0.1), (x, y), epochs=1, batch_size=16, key=key,
                  val_data=(x.at[3].set(jnp.inf), y))


def test_divergence_with_finite_inputs_blames_the_model(key):
    x, y = xor_data(40)
    with pytest.warns(RuntimeWarning, match="inputs of that batch are finite, so the model or "
                                            "the optimizer diverged"):
        res = train.fit(MODEL, losses.mse, optim.sgd(1e6), (x, jax.nn.one_hot(y, 2)), epochs=30,
                        batch_size=16, key=key, loop=train.Loop(progress=False))
    assert all(np.isfinite(v) for v in jax.tree.leaves(
        jax.tree.map(lambda a: np.all(np.isfinite(a)), res.train_state.params)))
    assert len(res.history["epoch"]) > 2          # diverged inside a chain of epochs
    with pytest.warns(RuntimeWarning):            # a callback: epochs read back one by one
        one = train.fit(MODEL, losses.mse, optim.sgd(1e6), (x, jax.nn.one_hot(y, 2)), epochs=30,
                        batch_size=16, key=key, callbacks=[lambda *a: None],
                        loop=train.Loop(progress=False))
    assert_trees_close(one.train_state, res.train_state, rtol=0, atol=0)
    assert one.stop_reason == res.stop_reason
    assert {k: v for k, v in one.history.items() if k != "time"} == \
        {k: v for k, v in res.history.items() if k != "time"}


def test_nonfinite_gradient_with_finite_loss_keeps_the_last_finite_state(key):
    """A loss whose value is finite but whose gradient is NaN (0·√(p−p)): with or without the
    gradient norm the guard sees the NaN gradient in that step, so both settings stop at
    update 1 with the initial parameters."""
    def poisoned(pred, target, **kw):
        return CE(pred, target, **kw) + 0.0 * jnp.sqrt(pred[0, 0] - pred[0, 0])
    x, y = xor_data(40)
    params = MODEL.init(key, (16, 2))[0]
    for grad_norm in (False, True):
        with pytest.warns(RuntimeWarning, match=r"epoch 1, step 0 \(update 1 of the epoch\); the "
                                                r"inputs of that batch are finite"):
            res = train.fit(MODEL, poisoned, optim.sgd(0.1), (x, y), epochs=2, batch_size=16,
                            train_state=_start(MODEL, optim.sgd(0.1), key, params),
                            step=train.Step(grad_norm=grad_norm),
                            loop=train.Loop(progress=False))
        assert_trees_close(res.train_state.params, params, rtol=0, atol=0)
        assert int(res.train_state.step) == 0


@pytest.mark.parametrize("poisoned", [5, 37])
def test_guard_without_a_kept_copy_stops_where_the_replay_does(poisoned, key):
    """With grad_norm=True fit keeps no copy of the epoch's start (the in-loop guard keeps the
    last good state); with grad_norm=False it replays from a copy. A NaN example gives both
    the same state, step and history, and the state of plain SGD up to the bad batch."""
    x, y = xor_data(64)
    x = x.at[poisoned].set(jnp.nan)
    params = MODEL.init(key, (16, 2))[0]
    kw = dict(epochs=3, batch_size=16, train_state=_start(MODEL, optim.sgd(0.1), key, params),
              loop=train.Loop(shuffle=False, progress=False, check_data=False))
    runs = []
    for grad_norm in (False, True):
        with pytest.warns(RuntimeWarning, match=rf"step {poisoned // 16} "):
            runs.append(train.fit(MODEL, CE, optim.sgd(0.1), (x, y), **kw,
                                  step=train.Step(grad_norm=grad_norm)))
    a, b = runs
    assert_trees_close(a.train_state.params, b.train_state.params, rtol=0, atol=0)
    assert int(a.train_state.step) == int(b.train_state.step) == poisoned // 16
    assert a.history["loss"] == b.history["loss"] and a.stop_reason == b.stop_reason
    ref = _plain_sgd(params, x[:16 * (poisoned // 16)], y[:16 * (poisoned // 16)], 0.1, 1,
                     lambda p, xb, yb, e: CE(MODEL.apply(p, STATE, xb)[0], yb))
    assert_trees_close(a.train_state.params, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("poisoned", [37, 49])
def test_nan_guard_names_epoch_and_step_and_keeps_last_good_state(poisoned, key):
    """Batches of 16 in order: example 37 sits in batch 2 (0-based) of epoch 1, example 49 in
    the partial last batch 3; the steps before it happen, nothing after."""
    x, y = xor_data(50)
    bad = poisoned // 16
    params, _, _ = MODEL.init(key, (16, 2))
    kw = dict(batch_size=16, train_state=train.create_train_state(MODEL, SGD, key, (16, 2),
                                                                  params=params))
    # check_data=False lets the NaN reach training: the guard's test
    loop = dict(shuffle=False, progress=False, check_data=False)
    with pytest.warns(RuntimeWarning, match=rf"non-finite loss or gradient at epoch 1, step "
                                            rf"{bad} \(update {bad + 1} of the epoch\)"):
        result = train.fit(MODEL, CE, SGD, (x.at[poisoned].set(jnp.nan), y), epochs=3,
                           loop=train.Loop(**loop), **kw)
    assert len(result.history["epoch"]) == 1 and int(result.train_state.step) == bad
    assert f"epoch 1, step {bad}" in result.stop_reason
    assert "inputs of that batch hold NaN or Inf: a data problem" in result.stop_reason
    ref = _plain_sgd(params, x[:16 * bad], y[:16 * bad], 0.1, 1,
                     lambda p, xb, yb, e: CE(MODEL.apply(p, STATE, xb)[0], yb))
    assert_trees_close(result.train_state.params, ref, rtol=1e-10, atol=1e-12)
    assert np.isfinite(result.history["loss"][0])
    if poisoned == 37:
        with pytest.raises(FloatingPointError, match="epoch 1, step 2"):
            train.fit(MODEL, CE, SGD, (x.at[poisoned].set(jnp.nan), y), epochs=1,
                      loop=train.Loop(on_nonfinite="raise", **loop), **kw)


def _nan_blind(pred, target, **kw):
    """Cross-entropy of ``pred`` with NaN read as 0: a NaN example gives a finite loss (ln 2)
    but, through ``dW = xᵀ·dpred = NaN·0``, a NaN gradient; and once the parameters are NaN every
    later loss is ln 2 too, so a guard on the loss alone never fires."""
    return CE(jnp.where(jnp.isnan(pred), 0.0, pred), target, **kw)


@pytest.mark.parametrize("grad_norm,row", [(False, 37), (True, 37), (False, 60)])
def test_nan_gradient_with_finite_loss_stops_in_the_step_it_appears(grad_norm, row, key):
    """Example 37 (batch 2; or 60: the epoch's last batch, after which no step's loss could
    show it) holds a NaN; the loss stays finite in every step. fit stops at that step with
    plain SGD's state up to it, in memory and streamed alike; make_step's guard leaves the
    state as it was."""
    x, y = xor_data(64)
    x = x.at[row].set(jnp.nan)
    bad = row // 16
    params = MODEL.init(key, (16, 2))[0]
    loop = dict(shuffle=False, progress=False, check_data=False)
    ref = _plain_sgd(params, x[:16 * bad], y[:16 * bad], 0.1, 1,
                     lambda p, xb, yb, e: _nan_blind(MODEL.apply(p, STATE, xb)[0], yb))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    for data in ((x, y), lambda epoch: iter(batches)):
        with pytest.warns(RuntimeWarning, match=rf"epoch 1, step {bad} \(update {bad + 1} of "
                                                r"the epoch\); the inputs of that batch hold NaN"):
            res = train.fit(MODEL, _nan_blind, optim.sgd(0.1), data, epochs=3, batch_size=16,
                            train_state=_start(MODEL, optim.sgd(0.1), key, params),
                            step=train.Step(grad_norm=grad_norm), loop=train.Loop(**loop))
        assert int(res.train_state.step) == bad and len(res.history["epoch"]) == 1
        assert_trees_close(res.train_state.params, ref, rtol=1e-10, atol=1e-12)
    step = train.make_step(MODEL, _nan_blind, optim.sgd(0.1), grad_norm=grad_norm)
    ts = _start(MODEL, optim.sgd(0.1), key, params)
    new, m = step(ts, (x[16 * bad:16 * bad + 16], y[16 * bad:16 * bad + 16]))
    assert np.isfinite(m.loss) and not bool(m.finite)
    assert_trees_close(new.params, params, rtol=0, atol=0)


def test_early_stopping_restores_the_best_epoch_when_a_later_epoch_hits_a_nan(key):
    """Batches streamed in a fixed order; epoch 3's third batch holds a NaN. The guard stops in
    epoch 3 at its last good state, which validates better than epochs 1-2 (a trap: it is not a
    finished epoch); EarlyStopping(restore_best=True) hands back the best finished epoch's
    params, bit for bit those of a clean run of that many epochs."""
    x, y = xor_data(64)

    def batches(poison):
        def epoch_batches(epoch):
            for i in range(0, 64, 16):
                xb = x[i:i + 16]
                if poison and epoch == 3 and i == 32:
                    xb = xb.at[5, 0].set(jnp.nan)
                yield xb, y[i:i + 16]
        return epoch_batches

    def run(poison, epochs, restore_best=True):
        return train.fit(MODEL, CE, optax.adam(0.05), batches(poison), epochs=epochs,
                         val_data=(x, y), key=key,
                         callbacks=[train.EarlyStopping(100, restore_best=restore_best)],
                         loop=train.Loop(progress=False, check_data=False))
    with pytest.warns(RuntimeWarning, match=r"epoch 3, step 10 \(update 3 of the epoch\)"):
        res = run(True, 6)
    with pytest.warns(RuntimeWarning, match=r"epoch 3, step 10 \(update 3 of the epoch\)"):
        last_good = run(True, 6, restore_best=False)
    val = res.history["val_loss"]
    assert len(val) == 3 and val[2] < min(val[:2])       # the partial epoch looks best
    best = int(np.argmin(val[:2])) + 1
    assert res.best_epoch == best
    clean = run(False, best)
    assert_trees_close(res.train_state.params, clean.train_state.params, rtol=0, atol=0)
    assert int(last_good.train_state.step) == 4 * 2 + 2 == int(res.train_state.step)
    with pytest.raises(AssertionError):                  # the control: not the last good state
        assert_trees_close(res.train_state.params, last_good.train_state.params, rtol=0,
                           atol=0)
