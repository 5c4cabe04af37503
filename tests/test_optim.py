"""fnn.optim optimizers against optax and against float64 NumPy transcriptions of their rules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn.optim as fo
from fnn.optim import schedules

STEPS = 200
SHAPES = {"dense": {"w": (3, 4), "b": (4,)}, "head": [(4, 2)], "scale": ()}
DTYPES = {"dense": {"w": np.float32, "b": np.float32}, "head": [np.float64], "scale": np.float64}
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_problem(seed=0, steps=STEPS):
    """A tree with float32 and float64 leaves (a scalar among them) and ``steps`` random grads."""
    rng = np.random.default_rng(seed)
    shapes = jax.tree.leaves(SHAPES, is_leaf=_is_shape)
    dtypes = jax.tree.leaves(DTYPES)
    treedef = jax.tree.structure(SHAPES, is_leaf=_is_shape)
    params = [jnp.asarray(rng.normal(size=s), d) for s, d in zip(shapes, dtypes)]
    grads = [jnp.asarray(rng.normal(size=(steps, *s)), d) for s, d in zip(shapes, dtypes)]
    return jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, grads)


def run(opt, params, grads, apply=fo.apply_updates):
    """``len(grads)`` optimizer steps inside one ``lax.scan``; returns (params, state)."""
    def step(carry, g):
        p, s = carry
        u, s = opt.update(g, s, p)
        return (apply(p, u), s), None

    (params, state), _ = jax.lax.scan(step, (params, opt.init(params)), grads)
    return params, state


def assert_optimizer_trees_close(actual, expected, scale=1.0):
    """Same structure and dtypes; each entry within ``RTOL`` of its value or of the largest entry
    of its leaf (an entry that ends near 0 by cancellation is judged at its leaf's scale: fnn and
    optax are each ~6 float32 ulps from the float64 run after 200 steps, and how far apart they
    land depends on the compiler's instruction choice, 0 or 1 ulp)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype
        tol = scale * RTOL[a.dtype]
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * float(np.max(np.abs(e))) + 1e-30)


MASK = fo.not_named("b")  # decay everything but biases
OPTIMIZERS = {  # name: (fnn constructor, optax constructor), each taking the learning rate
    "sgd": (fo.sgd, optax.sgd),
    "sgd_momentum": (lambda lr: fo.sgd(lr, 0.9), lambda lr: optax.sgd(lr, 0.9)),
    "sgd_nesterov": (lambda lr: fo.sgd(lr, 0.9, True), lambda lr: optax.sgd(lr, 0.9, True)),
    "adagrad": (fo.adagrad, optax.adagrad),
    "rmsprop": (fo.rmsprop, optax.rmsprop),
    "rmsprop_centered": (lambda lr: fo.rmsprop(lr, centered=True),
                         lambda lr: optax.rmsprop(lr, centered=True)),
    "rmsprop_momentum": (lambda lr: fo.rmsprop(lr, momentum=0.9, nesterov=True),
                         lambda lr: optax.rmsprop(lr, momentum=0.9, nesterov=True)),
    "adam": (fo.adam, optax.adam),
    "adamw_masked": (
        lambda lr: fo.adamw(lr, weight_decay=0.1, mask=MASK),
        lambda lr: optax.adamw(lr, weight_decay=0.1,
                               mask=lambda p: fo.resolve_mask(MASK, p))),
    "adamax": (fo.adamax, optax.adamax),
    "nadam": (fo.nadam, optax.nadam),
    "lion": (lambda lr: fo.lion(lr, weight_decay=0.1), lambda lr: optax.lion(lr, weight_decay=0.1)),
}
RATES = {"constant": 1e-2, "schedule": schedules.warmup_cosine(0.0, 3e-2, 20, STEPS, 1e-3)}


PUBLIC = ["sgd_momentum", "adagrad", "rmsprop_momentum", "adam", "adamw_masked", "adamax",
          "nadam", "lion"]  # one case per public optimizer, for the scheduled runs
CASES = [(n, "constant") for n in OPTIMIZERS] + [(n, "schedule") for n in PUBLIC]


def _without_rate(opt_state):
    """fnn keeps the learning rate in its state (optax does not): drop it, keep the count."""
    def strip(node):
        if isinstance(node, fo.LearningRateState):
            return ()
        return (node.count,) if isinstance(node, fo.ScheduledLearningRateState) else node
    rate_node = lambda n: isinstance(n, (fo.LearningRateState, fo.ScheduledLearningRateState))
    return jax.tree.map(strip, opt_state, is_leaf=rate_node)


@pytest.mark.parametrize("name, rate", CASES)
def test_matches_optax(name, rate):
    ours, theirs = OPTIMIZERS[name]
    lr = RATES[rate]  # the same schedule function drives both; schedules are tested on their own
    params, grads = make_problem()
    (p_fnn, s_fnn), (p_ref, s_ref) = jax.jit(
        lambda p, g: (run(ours(lr), p, g), run(theirs(lr), p, g, optax.apply_updates)))(
        params, grads)
    assert_optimizer_trees_close(p_fnn, p_ref)
    assert not jax.tree.leaves(jax.tree.map(lambda a, b: np.allclose(a, b) or None,
                                            p_fnn, params))  # the params did move
    fnn_state, ref_state = jax.tree.leaves(_without_rate(s_fnn)), jax.tree.leaves(s_ref)
    assert len(fnn_state) == len(ref_state)
    for a, b in zip(fnn_state, ref_state):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------- NumPy transcriptions

def numpy_run(rule, params, grads, lr):
    """Apply ``rule(g, state, t) -> (direction, state)`` leaf by leaf in float64 NumPy."""
    ps = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
    gs = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    states = [None] * len(ps)
    for t in range(len(gs[0])):
        for i, p in enumerate(ps):
            d, states[i] = rule(gs[i][t], states[i], t + 1, p)
            ps[i] = p - lr(t) * d
    return ps


def momentum_rule(beta, nesterov, ema):
    def rule(g, v, t, p):
        v = np.zeros_like(g) if v is None else v
        damp = (1 - beta) if ema else 1.0
        v = beta * v + damp * g
        return (beta * v + damp * g if nesterov else v), v
    return rule


def adam_rule(b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """Kingma & Ba (2015), Algorithm 1; ``wd``: AdamW's decoupled decay (Loshchilov & Hutter)."""
    def rule(g, state, t, p):
        m, v = state if state is not None else (np.zeros_like(g), np.zeros_like(g))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        return m_hat / (np.sqrt(v_hat) + eps) + wd * p, (m, v)
    return rule


def f64_problem():
    params, grads = make_problem(seed=1, steps=50)
    return jax.tree.map(lambda x: x.astype(np.float64), (params, grads))


def test_sgd_momentum_matches_numpy():
    params, grads = f64_problem()
    lr = schedules.step_decay(0.1, 0.5, 10)
    forms = [(ema, nesterov) for ema in (False, True) for nesterov in (False, True)]
    got = jax.jit(lambda p, g: [run(fo.sgd(lr, 0.8, n, ema=e), p, g)[0] for e, n in forms])(
        params, grads)  # one compilation for the four forms
    for (ema, nesterov), out in zip(forms, got):
        want = numpy_run(momentum_rule(0.8, nesterov, ema), params, grads,
                         lambda t: 0.1 * 0.5 ** (t // 10))
        for a, b in zip(jax.tree.leaves(out), want):
            np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=f"ema={ema} nesterov={nesterov}")


def test_ema_momentum_is_heavy_ball_with_scaled_rate():
    params, grads = f64_problem()
    ema, heavy = jax.jit(lambda p, g: (run(fo.sgd(0.1, 0.9, ema=True), p, g)[0],
                                       run(fo.sgd(0.1 * (1 - 0.9), 0.9), p, g)[0]))(params, grads)
    assert_optimizer_trees_close(ema, heavy, scale=100.0)


def test_adam_and_adamw_match_numpy():
    params, grads = f64_problem()
    adam, adamw = jax.jit(lambda p, g: (run(fo.adam(1e-2), p, g)[0],
                                        run(fo.adamw(1e-2, weight_decay=0.1), p, g)[0]))(
        params, grads)
    for out, wd in ((adam, 0.0), (adamw, 0.1)):
        want = numpy_run(adam_rule(wd=wd), params, grads, lambda t: 1e-2)
        for a, b in zip(jax.tree.leaves(out), want):
            np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=f"weight decay {wd}")


# --------------------------------------------------------------------------- interoperation

def test_chains_mix_fnn_and_optax_transforms():
    params, grads = make_problem(steps=10)
    clip = optax.clip_by_global_norm(1.0)
    both = {
        "optax.chain(fnn)": optax.chain(clip, fo.sgd(1e-2, 0.9)),
        "fnn.chain(optax)": fo.chain(clip, fo.trace(0.9), optax.scale_by_learning_rate(1e-2)),
        "reference": optax.chain(clip, optax.sgd(1e-2, 0.9)),
    }
    out = jax.jit(lambda p, g: {k: run(t, p, g)[0] for k, t in both.items()})(params, grads)
    assert_optimizer_trees_close(out["optax.chain(fnn)"], out["reference"])
    assert_optimizer_trees_close(out["fnn.chain(optax)"], out["reference"])
    assert not np.allclose(out["reference"]["scale"], params["scale"])


def test_optax_drives_fnn_model_params(key, rng):
    from fnn.combinators import serial
    from fnn.layers import Dense, Tanh
    model = serial(Dense(8), Tanh(), Dense(1))
    # fnn's param tree, filled from NumPy (eval_shape: no random-number kernels to compile)
    shapes, state = jax.eval_shape(lambda k: model.init(k, (16, 3))[:2], key)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    x = jnp.asarray(rng.normal(size=(16, 3)))
    y = jnp.sum(jnp.sin(x), axis=1, keepdims=True)
    loss = jax.jit(lambda p: jnp.mean((model.apply(p, state, x)[0] - y) ** 2))

    def train(opt, apply):
        def step(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return (apply(p, u), s), None
        return jax.lax.scan(step, (params, opt.init(params)), None, length=20)[0][0]

    by_optax = jax.jit(lambda: train(optax.adam(1e-2), fo.apply_updates))()
    by_fnn = jax.jit(lambda: train(fo.adam(1e-2), optax.apply_updates))()
    assert_optimizer_trees_close(by_fnn, by_optax)
    assert loss(by_fnn) < 0.8 * loss(params)
