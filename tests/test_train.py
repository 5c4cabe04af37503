"""fnn.train, the loop: fit against a plain optax loop, the history, no recompilation, the
LR finder, the error messages and the plots.

Compilation dominates the cost here, so the tests share one model, loss and optimizer objects
and a few data sizes: ``fit`` reuses its compiled epoch whenever those agree.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_trees_close, xor_data

from fnn import backprop, data, losses, train
from fnn.layers import Dense, Tanh, serial

try:
    from fnn import optim
    ADAM = optim.adam(0.05)
except ImportError:  # fnn.optim is optional here: optax optimizers drive fnn models too
    ADAM = optax.adam(0.05)

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))
SGD = optax.sgd(0.1)
STATE = MODEL.init(jax.random.PRNGKey(0), (1, 2))[1]
VG = jax.jit(jax.value_and_grad(lambda p, x, y: CE(MODEL.apply(p, STATE, x)[0], y)))


def _reference(params, x, y, steps, batch=16):
    """Plain JAX + optax: ``steps`` SGD steps over x[0:16], x[16:32], ... (wrapping around).
    Returns the params and each step's (loss, batch size)."""
    opt_state, seen = SGD.init(params), []
    for k in range(steps):
        i = (k % -(-len(x) // batch)) * batch
        value, g = VG(params, x[i:i + batch], y[i:i + batch])
        updates, opt_state = SGD.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        seen.append((float(value), len(x[i:i + batch])))
    return params, seen


def _ce_direct(params, x, y):
    """Mean cross-entropy and accuracy from the equations, in NumPy float64."""
    z = np.asarray(MODEL.apply(params, STATE, x)[0], np.float64)
    logp = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    y = np.asarray(y)
    return -np.mean(logp[np.arange(len(y)), y]), np.mean(np.argmax(z, 1) == y)


@pytest.mark.parametrize("grad", ["autodiff", "manual", "function"])
def test_fit_matches_a_plain_optax_loop(grad, key):
    """shuffle=False: the same batches (16, 16, 16, then the partial 2) in the same order.
    ``"function"``: a gradient function passed in (here the hand rules, wrapped by hand)."""
    calls = []
    if grad == "function":
        vg = backprop.value_and_grad(MODEL, CE)
        grad = lambda *a, **k: calls.append(1) or vg(*a, **k)
    x, y = xor_data(50)
    params, _, _ = MODEL.init(key, (16, 2))
    result = train.fit(MODEL, CE, SGD, (x, y), epochs=2, batch_size=16,
                       train_state=train.create_train_state(MODEL, SGD, key, (16, 2),
                                                            params=params),
                       step=train.Step(grad=grad), loop=train.Loop(shuffle=False, progress=False))
    want, seen = _reference(params, x, y, 8)
    assert_trees_close(result.train_state.params, want, rtol=1e-10, atol=1e-12)
    assert int(result.train_state.step) == 8
    assert bool(calls) == callable(grad)                 # the function was traced and used
    expect = [sum(v * n for v, n in part) / 50 for part in (seen[:4], seen[4:])]
    np.testing.assert_allclose(result.history["loss"], expect, rtol=1e-10)


def test_fit_lowers_loss_and_history_is_consistent(key, capsys):
    (x, y), (xv, yv) = xor_data(64), xor_data(64, seed=1)
    result = train.fit(MODEL, CE, ADAM, (x, y), epochs=12, batch_size=16, val_data=(xv, yv),
                       key=key, step=train.Step(grad_norm=True), loop=train.Loop(progress="lines"))
    h = result.history
    assert h["epoch"] == list(range(1, 13))
    assert set(h) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                      "grad_norm", "time"}
    assert all(len(v) == 12 for v in h.values())
    assert h["loss"][-1] < 0.5 * h["loss"][0] and h["val_accuracy"][-1] > 0.9
    assert h["lr"] == [0.05] * 12 and all(g > 0 for g in h["grad_norm"])
    ts = result.train_state
    vl, va = _ce_direct(ts.params, xv, yv)           # val metrics of the final params
    np.testing.assert_allclose(h["val_loss"][-1], vl, rtol=1e-9)
    np.testing.assert_allclose(h["val_accuracy"][-1], va, rtol=1e-12)
    assert result.stop_reason is None and int(ts.step) == 12 * 4
    out = capsys.readouterr().err                   # progress lines go to stderr
    assert "epoch 12/12 loss" in out and "val_accuracy" in out


def test_frozen_params_history_and_callbacks(key, capsys):
    """With a zero learning rate each epoch's mean loss is the whole set's loss (shuffled
    batches of 16, 16, 16, 2 weighted by size), and evaluate() agrees; a callback sees each
    epoch and stops the run by returning True; progress="auto" off a terminal prints one line
    per epoch and the reason to stderr, nothing to stdout."""
    x, y = xor_data(50)
    seen = []
    cb = lambda epoch, ts, logs: seen.append((epoch, int(ts.step))) or epoch == 2
    result = train.fit(MODEL, CE, optax.sgd(0.0), (x, y), epochs=5, batch_size=16, key=key,
                       callbacks=[cb], loop=train.Loop(progress="auto"))
    out, err = capsys.readouterr()
    assert out == "" and [ln for ln in err.splitlines() if ln.startswith(("epoch", "fit:"))] == [
        "epoch 1/5 loss 0.6859 accuracy 0.4", "epoch 2/5 loss 0.6859 accuracy 0.4",
        "fit: a callback stopped training after epoch 2"]
    loss, acc = _ce_direct(result.train_state.params, x, y)
    np.testing.assert_allclose(result.history["loss"], [loss, loss], rtol=1e-10)
    np.testing.assert_allclose(result.history["accuracy"], [acc, acc], rtol=1e-12)
    ev = train.evaluate(MODEL, CE, result.train_state.params, STATE, (x, y), batch_size=16)
    np.testing.assert_allclose([ev["loss"], ev["accuracy"]], [loss, acc], rtol=1e-10)
    assert seen == [(1, 4), (2, 8)] and "callback stopped training after epoch 2" in \
        result.stop_reason


def _counting(loss):
    calls = []

    def counted(*a, **k):
        calls.append(1)                               # runs only while JAX traces
        return loss(*a, **k)
    counted.name = loss.name
    return counted, calls


def test_second_epoch_does_not_recompile_and_step_guard(key):
    """The loss runs only while JAX traces: its call count must not grow after epoch 1, nor
    after the first make_step call. A poisoned batch leaves the step's state unchanged."""
    x, y = xor_data(50)
    loss, calls = _counting(CE)
    after = {}
    cb = lambda epoch, ts, logs: after.setdefault(epoch, len(calls)) and None
    train.fit(MODEL, loss, SGD, (x, y), epochs=3, batch_size=16, key=key, callbacks=[cb],
              loop=train.Loop(progress=False))
    assert after[1] == after[3] == len(calls) > 0
    step = train.make_step(MODEL, loss, SGD)
    ts, before = train.create_train_state(MODEL, SGD, key, (16, 2)), len(calls)
    for i in range(3):
        ts, m = step(ts, (x[16 * i:16 * i + 16], y[16 * i:16 * i + 16]))
        assert bool(m.finite)
    new, m = step(ts, (x[:16].at[0, 0].set(jnp.inf), y[:16]))
    assert len(calls) == before + 1 and int(ts.step) == 3 and not bool(m.finite)
    assert_trees_close(new, ts, rtol=0, atol=0)


def test_lr_find_sweeps_until_divergence(key, tmp_path):
    """Least squares: the mean squared error has Hessian 2xᵀx/n, so plain SGD diverges once
    lr > 1/λ_max(xᵀx/n); the sweep must stop before max_lr and suggest less than that."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 3)))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]])
    lam = float(np.linalg.eigvalsh(np.asarray(x.T @ x) / 64).max())
    res = train.lr_find(Dense(1), losses.mse, optax.sgd, (x, y), batch_size=64, key=key,
                        min_lr=1e-4, max_lr=10.0, steps=60, plot=tmp_path / "lr.png")
    ratio = (10.0 / 1e-4) ** (1 / 59)
    np.testing.assert_allclose(res.lrs, 1e-4 * ratio ** np.arange(len(res.lrs)), rtol=1e-12)
    assert res.diverged and len(res.lrs) < 60
    assert res.losses[-1] > 4 * np.min(res.losses[:-1]) or not np.isfinite(res.losses[-1])
    assert np.all(res.losses[:-1] <= 4 * np.minimum.accumulate(res.losses[:-1]))
    assert 1e-5 <= res.suggestion < 1.0 / lam
    assert (tmp_path / "lr.png").stat().st_size > 0


def test_errors_name_the_problem(key):
    x, y = xor_data(16)
    fit = lambda *a, **k: train.fit(MODEL, CE, SGD, *a, **{"epochs": 1, "batch_size": 4, **k})
    with pytest.raises(ValueError, match="pass key="):
        fit((x, y))
    with pytest.raises(TypeError, match=r"expected a tuple \(x, target\).*length 1"):
        fit((x,), key=key)
    with pytest.raises(ValueError, match=r"same leading .* axis.*\(16, 2\).*\(15,\)"):
        fit((x, y[:15]), key=key)
    with pytest.raises(ValueError, match="grad must be .autodiff., .manual. or a function"):
        fit((x, y), key=key, step=train.Step(grad="bogus"))
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        fit((x, y), key=key, loop=train.Loop(on_nonfinite="ignore"))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        fit((x, y), key=key, batch_size=0)
    with pytest.raises(ValueError, match="no batch of 32 with drop_last"):
        fit((x, y), key=key, batch_size=32, loop=train.Loop(drop_last=True))
    with pytest.raises(TypeError, match="make_optimizer must be a function"):
        train.lr_find(MODEL, CE, SGD, (x, y), batch_size=4, key=key)


def test_plots_write_pngs(tmp_path):
    plot = pytest.importorskip("fnn.plot")
    pytest.importorskip("matplotlib")
    params = MODEL.init(jax.random.PRNGKey(1), (1, 2))[0]
    x, y = data.two_spirals(40, seed=0)
    paths = [plot.histograms(params, tmp_path / "w.png"),
             plot.activations(["relu", "tanh"], tmp_path / "act.png"),
             plot.decision_boundary(lambda g: MODEL.apply(params, STATE, jnp.asarray(g))[0],
                                    x, y, tmp_path / "b.png", resolution=30),
             plot.training_curves({"epoch": [1, 2], "loss": [1.0, 0.5],
                                   "val_loss": [1.1, 0.7]}, tmp_path / "c.png")]
    assert all(os.path.getsize(p) > 1000 for p in paths)
    with pytest.raises(ValueError, match=r"expected points of shape \(n, 2\), got \(40, 3\)"):
        plot.decision_boundary(lambda g: g, np.ones((40, 3)), y, tmp_path / "x.png")
    with pytest.raises(ValueError, match="expected a fit history with 'epoch'"):
        plot.training_curves({"loss": [1.0]}, tmp_path / "x.png")
