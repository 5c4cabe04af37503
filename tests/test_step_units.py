"""fnn.train.step on a linear model of 4 -> 2 behind a per-example scale (a model keyword), in
float64: one step by autodiff, by the hand rules and by a given gradient function against the
step worked with jax.grad on the equations (``(s·x) W + b``, mean squared error), with a
penalty, with loss scaling, augmentation, dropout keys, the guard and the finite checks; and
create_train_state's params, state and keys."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnn import backprop, losses, regularizers
from fnn.layers import BatchNorm, Dense, Dropout, serial
from fnn.precision import loss_scaling
from fnn.train import step as S
from fnn.train.metrics import mean_metric

from fake_layers import Scaled

MODEL = serial(Scaled(), Dense(2))
KEY = jax.random.PRNGKey(3)
X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
T = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2)))
SCALE = jnp.asarray([1.0, 2.0, -0.5])
LR = 0.1


def _ts(opt=optax.sgd(LR)):
    return S.create_train_state(MODEL, opt, KEY, (3, 4))


def _loss(p, x=X, t=T):
    z = (SCALE[:, None] * x) @ p["1"]["w"] + p["1"]["b"][None, :]
    return jnp.mean((z - t) ** 2)


def _check_sgd_step(ts, new, metrics=None, reg=0.0, x=X):
    value, g = jax.value_and_grad(_loss)(ts.params, x)
    g = jax.tree.map(lambda gi, p: gi + reg * p, g, ts.params)
    want = jax.tree.map(lambda p, gi: p - LR * gi, ts.params, g)
    np.testing.assert_allclose(new.params["1"]["w"], want["1"]["w"], rtol=1e-12)
    np.testing.assert_allclose(new.params["1"]["b"], want["1"]["b"], rtol=1e-12)
    assert int(new.step) == int(ts.step) + 1 and new.step.dtype == jnp.int32
    if metrics is not None:
        np.testing.assert_allclose(metrics.loss, value, rtol=1e-12)
        np.testing.assert_allclose(metrics.grad_norm, np.sqrt(sum(
            float(jnp.sum(a * a)) for a in jax.tree.leaves(g))), rtol=1e-12)
        assert bool(metrics.finite) and np.isnan(metrics.accuracy)


def _hand_grad(params, state, x, t, *, key=None, train=False, **kw):
    return backprop.value_and_grad(MODEL, losses.mse)(params, state, x, t, key=key,
                                                      train=train, **kw)


@pytest.mark.parametrize("grad", ["autodiff", "manual", "function"])
def test_one_step_against_the_equations(grad):
    ts = _ts()
    fn = _hand_grad if grad == "function" else grad
    make = S.make_step(MODEL, losses.mse, optax.sgd(LR), grad=fn, jit=False)
    new, m = make(ts, (X, T, {"scale": SCALE}))
    _check_sgd_step(ts, new, m)
    np.testing.assert_array_equal(new.key, ts.key)           # not stochastic: key kept
    assert new.state == ts.state


@pytest.mark.parametrize("grad", ["autodiff", "manual", "function"])
def test_a_penalty_adds_its_gradient_not_its_value(grad):
    ts = _ts()
    fn = _hand_grad if grad == "function" else grad
    make = S.make_step(MODEL, losses.mse, optax.sgd(LR), grad=fn, jit=False,
                       regularizer=regularizers.l2(0.5))
    new, m = make(ts, (X, T, {"scale": SCALE}))
    _check_sgd_step(ts, new, reg=0.5)
    np.testing.assert_allclose(m.loss, _loss(ts.params), rtol=1e-12)


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_loss_scaling_gives_the_unscaled_step(grad):
    opt = loss_scaling(optax.sgd(LR), initial=2.0 ** 10)
    ts = _ts(opt)
    make = S.make_step(MODEL, losses.mse, opt, grad=grad, jit=False,
                       regularizer=regularizers.l2(0.5))
    new, m = make(ts, (X, T, {"scale": SCALE}))
    _check_sgd_step(ts, new, reg=0.5)
    value, g = jax.value_and_grad(lambda p: _loss(p) + 0.25 * sum(
        jnp.sum(a * a) for a in jax.tree.leaves(p)))(ts.params)
    np.testing.assert_allclose(m.grad_norm, np.sqrt(sum(float(jnp.sum(a * a))
                                                        for a in jax.tree.leaves(g))), rtol=1e-6)
    np.testing.assert_allclose(m.loss, _loss(ts.params), rtol=1e-12)
    with pytest.raises(ValueError, match=r"^fit: loss scaling needs grad='autodiff' or "
                                         r"'manual'; a gradient function cannot be told the "
                                         r"scale$"):
        S.make_step(MODEL, losses.mse, opt, grad=_hand_grad, jit=False)(ts, (X, T, {"scale":
                                                                                    SCALE}))


def test_a_bad_grad_is_named():
    with pytest.raises(ValueError, match=r"^train: grad must be 'autodiff', 'manual' or a "
                                         r"function \(params, state, x, target, \*, key, "
                                         r"train, \*\*kw\) -> \(\(loss, state\), grads\), got "
                                         r"'hand'$"):
        S.make_step(MODEL, losses.mse, optax.sgd(LR), grad="hand")


def _nan_grad(params, state, x, t, *, key=None, train=False, **kw):
    (value, new_state), g = _hand_grad(params, state, x, t, key=key, train=train, **kw)
    return (value, new_state), jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), g)


def test_finite_judges_the_loss_and_the_gradient_as_asked():
    ts, batch = _ts(), (X, T, {"scale": SCALE})
    core = lambda **kw: S.step_core(MODEL, losses.mse, optax.sgd(LR).update, _nan_grad,
                                    **kw)
    assert not bool(core(grad_norm=True)(ts, batch)[1].finite)       # by the norm
    assert not bool(core()(ts, batch)[1].finite)                       # by all_finite
    out = core(check_grads=False)(ts, batch)[1]                        # by the loss alone
    assert bool(out.finite) and np.isnan(out.grad_norm) and out.size == 3
    bad = (X.at[0, 0].set(jnp.inf), T, {"scale": SCALE})
    for guard in (True, False):
        make = S.make_step(MODEL, losses.mse, optax.sgd(LR), grad="manual", jit=False,
                           guard=guard, grad_norm=False)
        new, m = make(ts, bad)
        assert not bool(m.finite) and np.isnan(m.grad_norm)
        assert (int(new.step) == 0) == guard
        assert np.all(np.isfinite(new.params["1"]["w"])) == guard
    nan_penalty = regularizers.Regularizer(lambda p: jnp.zeros(()), lambda p: jax.tree.map(
        lambda a: jnp.full_like(a, jnp.nan), p))              # a NaN gradient, a finite loss
    opt = loss_scaling(optax.sgd(LR))
    for grad_norm in (False, True):
        out = S.step_core(MODEL, losses.mse, optax.sgd(LR).update, "manual",
                          regularizer=nan_penalty, grad_norm=grad_norm)(ts, batch)[1]
        assert not bool(out.finite)
        out = S.step_core(MODEL, losses.mse, opt.update, "manual", regularizer=nan_penalty,
                          grad_norm=grad_norm)(_ts(opt), batch)[1]
        assert bool(out.finite)                      # the optimizer skips it: loss alone


def test_metrics_stats_weigh_each_example_once():
    ts = _ts()
    metric = mean_metric("err", lambda pred, t: jnp.sum(jnp.abs(pred - t), -1))
    for grad in ("autodiff", _hand_grad):
        _, out = S.step_core(MODEL, losses.mse, optax.sgd(LR).update, grad, (metric,))(
            ts, (X, T, {"scale": SCALE}))
        pred = (SCALE[:, None] * X) @ ts.params["1"]["w"] + ts.params["1"]["b"][None, :]
        np.testing.assert_allclose(out.stats[0][0], np.sum(np.abs(pred - T)), rtol=1e-12)
        assert float(out.stats[0][1]) == 3.0 and out.stats[0][1].dtype == jnp.float64


def test_accuracy_of_a_classifier_step():
    model = Dense(3)
    ts = S.create_train_state(model, optax.sgd(LR), KEY, (3, 4))
    y = jnp.asarray([0, 2, 1])
    _, m = S.make_step(model, losses.softmax_cross_entropy_with_integer_labels,
                       optax.sgd(LR))(ts, (X, y))
    z = np.asarray(X) @ np.asarray(ts.params["w"]) + np.asarray(ts.params["b"])
    np.testing.assert_allclose(m.accuracy, np.mean(np.argmax(z, 1) == np.asarray(y)))


def test_augment_sees_the_step_key_and_dropout_a_fresh_key():
    seen = []

    def augment(key, x, t):
        seen.append(key)
        return 2 * x, t
    ts = _ts()._replace(step=jnp.int32(5))
    new, _ = S.step_core(MODEL, losses.mse, optax.sgd(LR).update, augment=augment)(
        ts, (X, T, {"scale": SCALE}))
    np.testing.assert_array_equal(seen[0], jax.random.fold_in(ts.key, 5))
    _check_sgd_step(ts, new, x=2 * X)
    model = serial(Dropout(0.5), Dense(2))
    ts = S.create_train_state(model, optax.sgd(LR), KEY, (3, 4))
    new, _ = S.step_core(model, losses.mse, optax.sgd(LR).update)(ts, (X, T, {}))
    key, sub = jax.random.split(ts.key)
    np.testing.assert_array_equal(new.key, key)
    g = jax.grad(lambda p: losses.mse(model.apply(p, ts.state, X, key=sub, train=True)[0],
                                      T))(ts.params)
    np.testing.assert_allclose(new.params["1"]["w"], ts.params["1"]["w"] - LR * g["1"]["w"],
                               rtol=1e-12)


class _Counting:
    """A model whose concrete ``init`` calls are counted (traced ones are not)."""

    def __init__(self, model):
        self.model, self.inits = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def init(self, key, shape):
        if not isinstance(key, jax.core.Tracer):
            self.inits += 1
        return self.model.init(key, shape)


def test_create_train_state_inits_only_what_is_not_given():
    opt = optax.adam(0.1)
    k_init, k_train = jax.random.split(KEY)
    stateful = serial(Dense(2), BatchNorm())
    params, state, _ = stateful.init(k_init, (3, 4))
    ts = S.create_train_state(stateful, opt, KEY, (3, 4))
    assert jax.tree.all(jax.tree.map(np.array_equal, (ts.params, ts.state), (params, state)))
    np.testing.assert_array_equal(ts.key, k_train)
    assert ts.step.dtype == jnp.int32 and ts.step.shape == () and int(ts.step) == 0
    assert jax.tree.all(jax.tree.map(np.array_equal, ts.opt_state, opt.init(params)))
    mine = jax.tree.map(lambda a: a + 1, params)
    mine_state = jax.tree.map(lambda a: a + 2, state)
    ts = S.create_train_state(stateful, opt, KEY, (3, 4), params=mine)
    assert ts.params is mine and jax.tree.all(jax.tree.map(np.array_equal, ts.state, state))
    ts = S.create_train_state(stateful, opt, KEY, (3, 4), state=mine_state)
    assert ts.state is mine_state
    assert jax.tree.all(jax.tree.map(np.array_equal, ts.params, params))
    ts = S.create_train_state(stateful, opt, KEY, (3, 4), params=mine, state=mine_state)
    assert ts.params is mine and ts.state is mine_state
    counted = _Counting(Dense(2))
    given = counted.init(k_init, (3, 4))[0]
    ts = S.create_train_state(counted, opt, KEY, (3, 4), params=given)
    assert counted.inits == 1 and ts.params is given and ts.state == {}


def test_training_mode_and_keys_reach_every_gradient_path():
    """BatchNorm normalises by the batch only in training mode, Dropout needs the step's key:
    each path (hand rules, a gradient function's prediction for the metrics) gets both."""
    model = serial(Dropout(0.5), Dense(2), BatchNorm())
    ts = S.create_train_state(model, optax.sgd(LR), KEY, (3, 4))
    key, sub = jax.random.split(ts.key)

    def objective(p):
        pred = model.apply(p, ts.state, X, key=sub, train=True)[0]
        return losses.mse(pred, T), pred
    (_, pred), g = jax.value_and_grad(objective, has_aux=True)(ts.params)
    metric = mean_metric("err", lambda p, t: jnp.sum(jnp.abs(p - t), -1))

    def given(params, state, x, t, *, key=None, train=False, **kw):
        return backprop.value_and_grad(model, losses.mse)(params, state, x, t, key=key,
                                                          train=train, **kw)
    for grad in ("manual", given):
        new, out = S.step_core(model, losses.mse, optax.sgd(LR).update, grad, (metric,))(
            ts, (X, T, {}))
        np.testing.assert_array_equal(new.key, key)
        np.testing.assert_allclose(new.params["1"]["w"], ts.params["1"]["w"] - LR * g["1"]["w"],
                                   rtol=1e-10)
        np.testing.assert_allclose(out.stats[0][0], np.sum(np.abs(pred - T)), rtol=1e-10)


def test_the_optimizer_sees_the_params_and_a_bare_model_is_stochastic():
    opt = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(LR))      # reads the params
    ts = _ts(opt)
    new, _ = S.make_step(MODEL, losses.mse, opt, jit=False)(ts, (X, T, {"scale": SCALE}))
    _check_sgd_step(ts, new, reg=0.5)

    class Bare:                          # no `stochastic`: taken as stochastic (key split)
        apply = staticmethod(MODEL.apply)
    new, _ = S.step_core(Bare(), losses.mse, optax.sgd(LR).update)(_ts(), (X, T,
                                                                         {"scale": SCALE}))
    np.testing.assert_array_equal(new.key, jax.random.split(_ts().key)[0])


def test_a_bad_batch_is_named_as_the_train_steps():
    make = S.make_step(MODEL, losses.mse, optax.sgd(LR), jit=False)
    with pytest.raises(TypeError, match=r"^train step: expected a tuple \(x, target\) or "
                                        r"\(x, target, model_kwargs\), got a tuple of length 1"):
        make(_ts(), (X,))
