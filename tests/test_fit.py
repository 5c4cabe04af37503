"""fit's step options against plain loops (regularizer, augmentation), the history's learning
rate, the compiled epoch reused for equal optimizers and models, and donation of the train
state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TRACES, assert_trees_close, counted_ce, xor_data

from fnn import losses, optim, regularizers, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))
STATE = MODEL.init(jax.random.PRNGKey(0), (1, 2))[1]


def _plain_sgd(params, x, y, lr, epochs, objective, batch=16, extra=lambda t: t):
    """Plain optax SGD over x[0:16], x[16:32], ... each epoch; ``objective(p, xb, yb, e)``
    with ``e = extra(t)`` for update ``t``."""
    opt = optax.sgd(lr)
    s, t = opt.init(params), 0
    vg = jax.jit(jax.grad(objective))
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            g = vg(params, x[i:i + batch], y[i:i + batch], extra(t))
            u, s = opt.update(g, s, params)
            params, t = optax.apply_updates(params, u), t + 1
    return params


def _start(model, optimizer, key, params, batch=(16, 2)):
    """The train state ``fit`` starts from with these ``params``."""
    return train.create_train_state(model, optimizer, key, batch, params=params)


def _differ(a, b):
    """The control, not a comparison: some entry of the two trees differs beyond NumPy's
    ``allclose(rtol=1e-6)`` (what a test adds, a penalty or an augmentation, moves the result
    far past that test's 1e-10, so its comparison could fail)."""
    return not all(np.allclose(u, v, rtol=1e-6) for u, v in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_regularizer_on_both_gradient_paths_matches_plain_loop(grad, key):
    """fit with an L2 penalty equals plain SGD on CE + penalty (a penalty dropped or counted
    twice moves the weights by ~λ·lr·w per step: far beyond the tolerance)."""
    x, y = xor_data(40)
    l2 = regularizers.l2(0.05)
    params = MODEL.init(key, (16, 2))[0]
    res = train.fit(MODEL, CE, optim.sgd(0.2), (x, y), epochs=2, batch_size=16,
                    train_state=_start(MODEL, optim.sgd(0.2), key, params),
                    step=train.Step(grad=grad, regularizer=l2),
                    loop=train.Loop(shuffle=False, progress=False))
    want = _plain_sgd(params, x, y, 0.2, 2,
                      lambda p, xb, yb, t: CE(MODEL.apply(p, STATE, xb)[0], yb) + l2(p))
    assert_trees_close(res.train_state.params, want, rtol=1e-10, atol=1e-12)
    without = _plain_sgd(params, x, y, 0.2, 2,
                         lambda p, xb, yb, t: CE(MODEL.apply(p, STATE, xb)[0], yb))
    assert _differ(want, without)


def test_augment_runs_inside_the_step_with_the_documented_key(key):
    """Noise augmentation keyed by fold_in(train key, update count), against a plain loop."""
    x, y = xor_data(40)

    def noise(k, xb, yb):
        return xb + 0.3 * jax.random.normal(k, xb.shape, xb.dtype), yb
    params = MODEL.init(key, (16, 2))[0]
    res = train.fit(MODEL, CE, optim.sgd(0.2), (x, y), epochs=2, batch_size=16,
                    train_state=_start(MODEL, optim.sgd(0.2), key, params),
                    step=train.Step(augment=noise),
                    loop=train.Loop(shuffle=False, progress=False))
    k = jax.random.split(key)[1]                          # create_train_state's train key
    k1 = jax.random.split(k)[0]                           # epoch 1 splits it once
    k2 = jax.random.split(k1)[0]                          # and epoch 2 again
    steps_per_epoch = 3

    def objective(p, xb, yb, k):
        xa, ya = noise(k, xb, yb)
        return CE(MODEL.apply(p, STATE, xa)[0], ya)
    want = _plain_sgd(params, x, y, 0.2, 2, objective, extra=lambda t: jax.random.fold_in(
        k1 if t < steps_per_epoch else k2, t))
    assert_trees_close(res.train_state.params, want, rtol=1e-10, atol=1e-12)
    plain = train.fit(MODEL, CE, optim.sgd(0.2), (x, y), epochs=2, batch_size=16,
                      train_state=_start(MODEL, optim.sgd(0.2), key, params),
                      loop=train.Loop(shuffle=False, progress=False))
    assert _differ(plain.train_state.params, want)


def test_equal_optimizers_and_models_reuse_the_compiled_epoch(key):
    """fit with optim.sgd built afresh (another rate too) and the model rebuilt traces nothing
    new; a different optimizer rule does (so the counter can fail)."""
    x, y = xor_data(40)
    run = lambda opt, model=MODEL: train.fit(model, counted_ce, opt, (x, y), epochs=2,
                                             batch_size=16, key=key,
                                             loop=train.Loop(progress=False))
    first = run(optim.sgd(0.01))
    traced = len(TRACES)
    again = run(optim.sgd(0.01), serial(Dense(4), Tanh(), Dense(2)))
    other_rate = run(optim.sgd(0.3))
    assert len(TRACES) == traced > 0
    assert_trees_close(first.train_state.params, again.train_state.params, rtol=0, atol=0)
    assert other_rate.history["lr"] == [0.3, 0.3]       # the rate is an input, not a constant
    assert not np.allclose(other_rate.history["loss"], first.history["loss"])
    run(optim.sgd(0.01, momentum=0.9))
    assert len(TRACES) > traced


def test_public_names_stay_importable():
    from fnn.train import (FitResult, LRFindResult, StepMetrics, TrainState,  # noqa: F401
                           binary_accuracy, categorical_accuracy, create_train_state, evaluate,
                           fit, lr_find, make_step)
    assert callable(fit) and TrainState._fields == ("params", "state", "opt_state", "step",
                                                    "key")


def test_fingerprint_sees_values_not_objects():
    from fnn.train.cache import fingerprint
    make = lambda s: (lambda v: v * s)
    assert fingerprint(make(2.0)) == fingerprint(make(2.0)) != fingerprint(make(3.0))
    assert fingerprint(Dense(3)) == fingerprint(Dense(3)) != fingerprint(Dense(4))
    namespace = {}
    for scale in (1.0, 1.0, 2.0):                 # a notebook cell run three times
        exec(f"SCALE = {scale}\ndef loss(p, t):\n    return SCALE * (p - t)", namespace)
        namespace.setdefault("seen", []).append(fingerprint(namespace["loss"]))
    a, b, c = namespace["seen"]
    assert a == b != c


def test_history_lr_from_fnn_optimizer_state(key):
    x, y = xor_data(40)
    sched = optim.schedules.exponential_decay(0.1, 0.5, 3)       # halves every epoch here
    h = train.fit(MODEL, CE, optim.adam(sched), (x, y), epochs=3, batch_size=16, key=key,
                  loop=train.Loop(progress=False)).history
    np.testing.assert_allclose(h["lr"], [0.1 * 0.5 ** ((3 * e - 1) / 3) for e in (1, 2, 3)],
                               rtol=1e-12)


@pytest.mark.parametrize("epochs", [0, -3, 2.0])
def test_epochs_must_be_positive(epochs, key):
    x, y = xor_data(40)
    with pytest.raises(ValueError, match=f"fit: epochs must be a positive int, got {epochs}"):
        train.fit(MODEL, CE, optim.sgd(0.1), (x, y), epochs=epochs, batch_size=16, key=key)


# --------------------------------------------------------------------------- donation

def test_epoch_donates_the_state_and_computes_what_a_non_donating_epoch_does(key):
    """The compiled epoch reuses the params', model state's and optimizer state's buffers (they
    are deleted after the call); step and key stay readable; the numbers are those of the same
    epoch compiled without donation."""
    from fnn.train.epoch import make_epoch_runner
    x, y = xor_data(40)
    args = (MODEL, CE, optim.adam(0.01).update, "autodiff", (), None, False, None, 40, 16,
            False, True)
    donating, sizes = make_epoch_runner(*args)
    plain, _ = make_epoch_runner(*args, None, jax.jit)
    ts = train.create_train_state(MODEL, optim.adam(0.01), key, (16, 2))
    keep = jax.tree.map(jnp.copy, ts)
    data = (x, y, {})
    want, flat_want, _ = plain(keep, data, np.int32(len(sizes)))
    got, flat, nxt = donating(ts, data, np.int32(len(sizes)))
    assert all(a.is_deleted() for a in jax.tree.leaves((ts.params, ts.opt_state)))
    assert not ts.step.is_deleted() and not ts.key.is_deleted()
    assert not any(a.is_deleted() for a in jax.tree.leaves(keep))     # not donated
    assert_trees_close(got, want, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(flat_want))
    assert int(nxt) == len(sizes)


def test_fit_leaves_the_callers_arrays_alive_and_unchanged(key):
    x, y = xor_data(40)
    ts = train.create_train_state(MODEL, optim.adam(0.01), key, (16, 2))
    before = jax.tree.map(np.array, ts)
    for kw in (dict(train_state=ts),
               dict(train_state=_start(MODEL, optim.adam(0.01), key, ts.params))):
        res = train.fit(MODEL, CE, optim.adam(0.01), (x, y), epochs=3, batch_size=16, **kw,
                        loop=train.Loop(progress=False))
        assert not any(a.is_deleted() for a in jax.tree.leaves(ts))
        assert_trees_close(ts.params, before.params, rtol=0, atol=0)
        assert int(res.train_state.step) == 9
    again = train.fit(MODEL, CE, optim.adam(0.01), (x, y), epochs=3, batch_size=16, train_state=ts,
                      loop=train.Loop(progress=False))          # the same start: the same run
    assert_trees_close(again.train_state, res.train_state, rtol=0, atol=0)


def test_with_a_kept_start_the_epoch_does_not_donate_and_copies_nothing(key, monkeypatch):
    """grad_norm=False keeps each epoch's start for the replay: the runner then does not
    donate, so that start is the kept copy and fit makes no copy per epoch; grad_norm=True
    donates (copies keep the caller's arrays and a launched-ahead start alive). Both compute
    the same run."""
    from fnn.train import fitting, loops
    x, y = xor_data(40)
    copies = []
    real = loops.copy_state
    monkeypatch.setattr(loops, "copy_state", lambda t: copies.append(1) or real(t))
    monkeypatch.setattr(fitting, "copy_state", loops.copy_state)
    ts = train.create_train_state(MODEL, optim.adam(0.01), key, (16, 2))
    runs = []
    for grad_norm in (False, True):
        copies.clear()
        runs.append(train.fit(MODEL, CE, optim.adam(0.01), (x, y), epochs=3, batch_size=16,
                              train_state=ts, step=train.Step(grad_norm=grad_norm),
                              loop=train.Loop(progress=False)))
        assert (len(copies) >= 1) if grad_norm else not copies
        assert not any(a.is_deleted() for a in jax.tree.leaves(ts))
    # two programs (grad_norm adds a reduction), fused differently: equal to rounding
    assert_trees_close(runs[0].train_state, runs[1].train_state, rtol=1e-12, atol=1e-15)
