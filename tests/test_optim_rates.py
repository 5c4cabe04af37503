"""fnn.optim: the learning rate as optimizer state (read, changed without a recompile) and the
rejection of negative or non-finite rates."""
import jax
import jax.numpy as jnp
import optax
import pytest

from helpers import assert_trees_close

from fnn import optim
from fnn.optim import schedules

PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
GRADS = {"w": jnp.array([0.1, 0.2, -0.3]), "b": jnp.array(1.0)}
OPTIMIZERS = [optim.sgd, optim.adagrad, optim.rmsprop, optim.adam, optim.adamw, optim.adamax,
              optim.nadam, optim.lion]


@pytest.mark.parametrize("make", OPTIMIZERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_bad_learning_rates_are_rejected(make, bad):
    with pytest.raises(ValueError, match=r"learning_rate must be a finite number >= 0, got"):
        make(bad)


@pytest.mark.parametrize("build", [
    lambda: schedules.constant(-1.0), lambda: schedules.cosine_annealing(float("nan"), 10),
    lambda: schedules.warmup_cosine(0.0, -1e-3, 5, 10), lambda: schedules.one_cycle(10, -0.1),
    lambda: schedules.exponential_decay(1e-2, float("nan"), 10),
    lambda: schedules.piecewise_constant([5], [0.1, float("inf")]),
    lambda: schedules.linear(0.0, -1.0, 10)])
def test_bad_schedules_are_rejected(build):
    with pytest.raises(ValueError, match=r"must be (a finite number >= 0|positive), got"):
        build()


def test_set_learning_rate_rejects_bad_values_and_schedules():
    state = optim.sgd(0.1).init(PARAMS)
    with pytest.raises(ValueError, match="set_learning_rate: value must be a finite number"):
        optim.set_learning_rate(state, -0.1)
    with pytest.raises(ValueError, match="comes from a schedule"):
        optim.set_learning_rate(optim.sgd(schedules.constant(0.1)).init(PARAMS), 0.01)
    with pytest.raises(ValueError, match="holds no learning rate"):
        optim.set_learning_rate(optax.sgd(0.1).init(PARAMS), 0.01)
    with pytest.raises(ValueError, match="holds no learning rate"):
        optim.learning_rate(optax.sgd(0.1).init(PARAMS))


@pytest.mark.parametrize("kind", ["fnn", "optax.inject_hyperparams"])
def test_learning_rate_read_and_set_without_recompiling(kind):
    """SGD's update is -lr·g: after set_learning_rate the same jitted update (traced once)
    steps by the new rate."""
    opt = optim.sgd(0.1) if kind == "fnn" else optax.inject_hyperparams(optax.sgd)(
        learning_rate=0.1)
    traces = []

    @jax.jit
    def update(g, s):
        traces.append(1)
        return opt.update(g, s, PARAMS)
    state = opt.init(PARAMS)
    assert float(optim.learning_rate(state)) == 0.1
    u, state = update(GRADS, state)
    assert_trees_close(u, jax.tree.map(lambda g: -0.1 * g, GRADS), rtol=1e-15, atol=0)
    state = optim.set_learning_rate(state, 0.025)
    assert float(optim.learning_rate(state)) == 0.025
    u, state = update(GRADS, state)
    assert_trees_close(u, jax.tree.map(lambda g: -0.025 * g, GRADS), rtol=1e-15, atol=0)
    assert len(traces) == 1


def test_scheduled_rate_reports_the_last_update():
    sched = schedules.exponential_decay(0.1, 0.5, 1)       # 0.1 · 0.5^t
    opt = optim.adam(sched)
    state = opt.init(PARAMS)
    assert float(optim.learning_rate(state)) == pytest.approx(0.1)
    for t in range(3):
        _, state = opt.update(GRADS, state, PARAMS)
        assert float(optim.learning_rate(state)) == pytest.approx(0.1 * 0.5 ** t)


def test_rate_in_state_keeps_optax_steps_bit_for_bit():
    """The rate as a state array casts to the update's dtype exactly as a Python float did."""
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), PARAMS)
    g32 = jax.tree.map(lambda a: a.astype(jnp.float32), GRADS)
    for ours, theirs in [(optim.sgd(0.1), optax.sgd(0.1)), (optim.adam(3e-3), optax.adam(3e-3))]:
        u, _ = ours.update(g32, ours.init(p32), p32)
        v, _ = theirs.update(g32, theirs.init(p32), p32)
        assert_trees_close(u, v, rtol=0, atol=0)
