"""Schedules against their closed forms (float64 NumPy) at every step and boundary, and optax."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnn.optim import schedules as S

T = np.arange(0, 131)  # every step of every schedule below, boundaries and their neighbours


def cos_between(a, b, frac):
    """Cosine from ``a`` (frac 0) to ``b`` (frac 1)."""
    return b + 0.5 * (a - b) * (1 + np.cos(math.pi * np.minimum(frac, 1.0)))


def one_cycle_np(t, total=100, peak=1.0, div=25.0, final=1e4):
    warm = int(0.3 * total)
    start, end = peak / div, peak / div / final
    return np.where(t < warm, cos_between(start, peak, t / warm),
                    cos_between(peak, end, (t - warm) / (total - warm)))


CASES = {  # name: (fnn schedule, closed form over T, optax twin or None, boundaries)
    "constant": (S.constant(0.3), lambda t: np.full(t.shape, 0.3),
                 optax.constant_schedule(0.3), []),
    "linear": (S.linear(1.0, 0.2, 40), lambda t: 1.0 + (0.2 - 1.0) * np.minimum(t, 40) / 40,
               optax.linear_schedule(1.0, 0.2, 40), [40]),
    "step_decay": (S.step_decay(0.1, 0.5, 30), lambda t: 0.1 * 0.5 ** (t // 30),
                   optax.exponential_decay(0.1, 30, 0.5, staircase=True), [30, 60, 90, 120]),
    "exponential": (S.exponential_decay(1.0, 0.9, 10), lambda t: 0.9 ** (t / 10),
                    optax.exponential_decay(1.0, 10, 0.9), []),
    "exponential_floor": (S.exponential_decay(1.0, 0.9, 10, end_value=0.5),
                          lambda t: np.maximum(0.9 ** (t / 10), 0.5),
                          optax.exponential_decay(1.0, 10, 0.9, end_value=0.5), [66, 67]),
    "cosine": (S.cosine_annealing(1.0, 100, 0.1), lambda t: cos_between(1.0, 0.1, t / 100),
               optax.cosine_decay_schedule(1.0, 100, alpha=0.1), [100]),
    "warmup_cosine": (
        S.warmup_cosine(0.0, 1.0, 10, 100, 0.05),
        lambda t: np.where(t < 10, t / 10, cos_between(1.0, 0.05, (t - 10) / 90)),
        optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, 0.05), [10, 100]),
    "one_cycle": (S.one_cycle(100, 1.0), one_cycle_np, optax.cosine_onecycle_schedule(100, 1.0),
                  [30, 100]),
    "polynomial": (S.polynomial(1.0, 0.1, 2, 50, transition_begin=10),
                   lambda t: 0.1 + 0.9 * (1 - np.clip(t - 10, 0, 50) / 50) ** 2,
                   optax.polynomial_schedule(1.0, 0.1, 2, 50, transition_begin=10), [10, 60]),
    "piecewise_constant": (
        S.piecewise_constant([10, 20], [1.0, 0.1, 0.01]),
        lambda t: np.select([t < 10, t < 20], [1.0, 0.1], 0.01),
        optax.piecewise_constant_schedule(1.0, {10: 0.1, 20: 0.1}), [10, 20]),
    "join": (
        S.join([S.constant(1.0), S.linear(1.0, 0.0, 10), S.constant(0.5)], [5, 15]),
        lambda t: np.select([t < 5, t < 15], [1.0, 1.0 - (t - 5) / 10], 0.5),
        None, [5, 15]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_at_every_step(name):
    sched, closed, _, boundaries = CASES[name]
    got = jax.jit(jax.vmap(sched))(jnp.asarray(T, jnp.int32))  # traced int32 steps
    np.testing.assert_allclose(got, closed(T.astype(np.float64)), rtol=1e-12, atol=1e-15)
    for b in boundaries:  # Python-int steps, eagerly, on and around each boundary
        for t in (b - 1, b, b + 1):
            np.testing.assert_allclose(sched(t), closed(np.float64(t)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[2] is not None])
def test_matches_optax(name):
    sched, _, twin, _ = CASES[name]
    steps = jnp.asarray(T, jnp.int32)
    # some optax schedules work in float32 (int32 steps divided): float32 accuracy of O(1) values
    ours, theirs = jax.jit(lambda t: (jax.vmap(sched)(t), jax.vmap(twin)(t)))(steps)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6,
                               atol=1e-7)


def test_warmup_cosine_peaks_at_the_boundary_and_stays_at_the_floor():
    s = S.warmup_cosine(1e-4, 1e-2, 10, 50, 1e-3)
    assert float(s(0)) == pytest.approx(1e-4)
    assert float(s(10)) == pytest.approx(1e-2, rel=1e-12)
    assert float(s(9)) < float(s(10)) and float(s(11)) < float(s(10))
    assert float(s(50)) == float(s(500)) == pytest.approx(1e-3)


def test_schedule_drives_jitted_optimizer_steps():
    import fnn.optim as fo
    lr = S.piecewise_constant([2], [0.1, 0.01])
    opt = fo.sgd(lr)
    step = jax.jit(opt.update)
    g = {"w": jnp.ones(2)}
    state = opt.init(g)
    seen = []
    for _ in range(4):
        u, state = step(g, state)
        seen.append(float(-u["w"][0]))
    np.testing.assert_allclose(seen, [0.1, 0.1, 0.01, 0.01], rtol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="cosine_annealing: decay_steps must be positive, got 0"):
        S.cosine_annealing(1.0, 0)
    with pytest.raises(ValueError, match="warmup_cosine: cosine_steps must be positive"):
        S.warmup_cosine(0.0, 1.0, 10, 10)
    with pytest.raises(ValueError, match="piecewise_constant: expected 3 values for 2 boundaries"):
        S.piecewise_constant([1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="join: boundaries must increase"):
        S.join([S.constant(1.0)] * 3, [5, 2])
    with pytest.raises(ValueError, match="join: expected 2 schedules for 1 boundaries, got 1"):
        S.join([S.constant(1.0)], [5])
