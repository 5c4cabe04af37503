"""fnn.backprop: manual value_and_grad and the custom_vjp bridge, against jax.grad.

The reference everywhere is ``jax.grad`` of ``loss(model.apply(...))`` in float64 — autodiff of
the forward pass, independent of every hand-derived rule under test. To keep the file fast, each
test builds its data, initializes and runs both sides inside one ``jax.jit`` (one compilation;
eager JAX would compile every small op separately).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn.layers as L
from fnn import backprop, losses
from fnn.combinators import serial
from fnn.core import Layer, cast, from_backward

from helpers import assert_trees_close, no_autodiff


def assert_same(got, want, what=""):
    """``((value, state), grads)`` pairs agree: value to 1e-12, grads leafwise to 1e-10."""
    (v, s), g = got
    (w, t), h = want
    assert abs(v - w) <= 1e-12 * abs(w), f"{what} loss {v} != {w}"
    assert_trees_close(g, h, what=what, rtol=1e-10, atol=1e-12)
    assert_trees_close(s, t, what=what, rtol=1e-10, atol=1e-12)


RNG = np.random.default_rng


def normal(rng, shape):
    return rng.normal(size=shape)


def autodiff(model, loss, loss_kwargs=None):
    """The reference ``f(params, state, x, target, ...) -> ((loss, new_state), grads)`` by
    ``jax.value_and_grad`` of the forward pass."""
    def f(params, state, x, target, *, key=None, train=True, **kw):
        def value(p):
            y, new_state = model.apply(p, state, x, key=key, train=train, **kw)
            return loss(y, target, **(loss_kwargs or {})), new_state
        return jax.value_and_grad(value, has_aux=True)(params)
    return f


def init(model, x_shape, seed=0):
    """Eager ``model.init``: its random ops compile once per shape and are reused across tests
    (inside a jit they would be inlined and recompiled every time)."""
    params, state, out_shape = model.init(jax.random.PRNGKey(seed), x_shape)
    return params, state, out_shape


def pair(model, loss, loss_kwargs=None, **call):
    """Manual and autodiff ``((loss, new_state), grads)`` side by side (trace under jit)."""
    def f(params, state, x, t):
        return (backprop.value_and_grad(model, loss, loss_kwargs=loss_kwargs)(
            params, state, x, t, **call), autodiff(model, loss, loss_kwargs)(params, state, x, t,
                                                                             **call))
    return f


def both(model, loss, x_shape, *, make_x=normal, make_target=normal, loss_kwargs=None, **call):
    """:func:`pair` in one compiled function, on NumPy-generated data."""
    params, state, out_shape = init(model, x_shape)
    x, t = make_x(RNG(1), x_shape), make_target(RNG(2), out_shape)
    return jax.jit(pair(model, loss, loss_kwargs, **call))(params, state, x, t)


def mlp(act, out=3, last=()):
    return serial(L.Dense(5), act(), L.Dense(4), act(), L.Dense(out), *last)


# --------------------------------------------------------------------------- value_and_grad

ACTIVATIONS = [L.Relu(), L.Sigmoid(), L.Tanh(), L.LeakyRelu(0.2), L.Elu(), L.Selu(), L.Gelu(),
               L.Gelu(approximate=True), L.Swish(), L.Softplus(), L.PRelu(), L.Softmax(),
               L.LogSoftmax()]


def test_value_and_grad_equals_jax_grad_for_a_deep_mlp_of_every_activation():
    """One model, every activation: Dense(5) then each activation in turn."""
    model = serial(*[layer for act in ACTIVATIONS for layer in (L.Dense(5), act)], L.Dense(3))
    assert_same(*both(model, losses.mse, (4, 3)))


def _prob(rng, shape):
    return rng.uniform(0.05, 0.95, size=shape)


def _onehot(rng, shape):
    return np.eye(shape[-1])[rng.integers(0, shape[-1], shape[:-1])]


def _labels(rng, shape):
    return rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)


# (loss, model's last layers, target maker, loss_kwargs)
LOSS_CASES = {
    "mse": (losses.mse, (), normal, {}),
    "mse-weighted-sum": (losses.mse, (), normal, {"weights": jnp.arange(1.0, 5.0),
                                                  "reduction": "sum"}),
    "mae": (losses.mae, (), normal, {}),
    "huber": (losses.huber(0.5), (), normal, {}),
    "binary_cross_entropy": (losses.binary_cross_entropy, (L.Sigmoid(),), _prob, {}),
    "sigmoid_binary_cross_entropy": (losses.sigmoid_binary_cross_entropy, (), _prob, {}),
    "softmax_cross_entropy": (losses.softmax_cross_entropy, (), _onehot, {}),
    "softmax_cross_entropy-weighted": (losses.softmax_cross_entropy, (), _onehot,
                                       {"weights": jnp.array([1.0, 0.0, 2.0, 1.0])}),
    "softmax_cross_entropy_with_integer_labels": (
        losses.softmax_cross_entropy_with_integer_labels, (), _labels, {}),
}


def test_every_fnn_loss_is_covered():
    """A new loss in fnn.losses must join LOSS_CASES (losses and loss factories alike)."""
    covered = {case[0].name.split("(")[0] for case in LOSS_CASES.values()}
    for name in losses.__all__:
        obj = getattr(losses, name)
        if isinstance(obj, losses.Loss):
            assert obj.name in covered, f"fnn.losses.{name} is not tested against jax.grad"
        elif callable(obj) and name != "Loss":
            assert name in covered, f"loss factory fnn.losses.{name} is not tested"


def test_value_and_grad_equals_jax_grad_for_every_loss():
    """Every case in one compiled function: manual and autodiff gradients side by side."""
    models = {c: mlp(L.Tanh, 3, last) for c, (_, last, _, _) in LOSS_CASES.items()}
    fns = {c: pair(models[c], loss, lkw) for c, (loss, _, _, lkw) in LOSS_CASES.items()}
    args = {c: (*init(models[c], (4, 3))[:2], normal(RNG(1), (4, 3)), case[2](RNG(2), (4, 3)))
            for c, case in LOSS_CASES.items()}
    run = jax.jit(lambda args: {c: fns[c](*args[c]) for c in fns})
    for c, (got, want) in run(args).items():
        assert_same(got, want, what=f"loss case {c}: ")


def test_a_loss_without_grad_is_refused():
    with pytest.raises(TypeError, match="value_and_grad: the loss needs a hand-derived .grad"):
        backprop.value_and_grad(mlp(L.Relu), lambda y, t: jnp.mean((y - t) ** 2))


def test_runs_without_autodiff_and_grad_returns_only_grads(monkeypatch):
    model = serial(L.Embedding(7, 4), L.Flatten(), L.Dense(5), L.PRelu(), L.Dense(3))
    loss = losses.softmax_cross_entropy_with_integer_labels

    params, state, _ = init(model, (4, 2))
    args = (params, state, RNG(1).integers(0, 7, (4, 2)), RNG(2).integers(0, 3, (4,)))
    want = jax.jit(autodiff(model, loss))(*args)
    vg = backprop.value_and_grad(model, loss)
    with no_autodiff(monkeypatch):            # traced (and run) while autodiff is patched
        got, grads = jax.jit(lambda *a: (vg(*a), backprop.grad(model, loss)(*a)))(*args)
    assert_same(got, want)
    assert_trees_close(grads, want[1], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- keywords, key, state

def Scale() -> Layer:
    """Test layer with a per-call keyword: ``y = x · scale`` per example (scale: (batch,))."""
    def per_example(scale, x):
        return scale.reshape((-1,) + (1,) * (x.ndim - 1))

    def apply(params, state, x, *, key=None, train=False, scale):
        return x * per_example(scale, x), state

    def backward(params, state, x, dy, *, key=None, train=False, scale):
        return {}, dy * per_example(scale, x)
    return from_backward(lambda k, s: ({}, {}, s), apply, backward, name="Scale",
                         keywords={"scale"})


def Noise() -> Layer:
    """Test layer: in training multiplies by a key-drawn mask and counts its calls in state."""
    def mask(key, x):
        return jax.random.bernoulli(key, 0.6, x.shape).astype(x.dtype) / 0.6

    def apply(params, state, x, *, key=None, train=False):
        if not train:
            return x, state
        return x * mask(key, x), {"calls": state["calls"] + 1}

    def backward(params, state, x, dy, *, key=None, train=False):
        return {}, (dy * mask(key, x) if train else dy)
    return from_backward(lambda k, s: ({}, {"calls": jnp.zeros((), jnp.int32)}, s), apply,
                         backward, name="Noise", stochastic=True)


SCALE = jnp.array([0.5, 2.0, -1.0, 3.0])


@pytest.mark.parametrize("train", [True, False])
def test_keywords_key_and_state_are_carried(train):
    model = serial(L.Dense(5), Scale(), L.Tanh(), Noise(), L.Dense(3))
    got, want = both(model, losses.mse, (4, 3), key=jax.random.PRNGKey(11), train=train,
                     scale=SCALE)
    assert_same(got, want)
    assert int(got[0][1]["3"]["calls"]) == int(train)      # (Scale requires scale=: a keyword
                                                           #  lost on the way would raise)


def test_unknown_keyword_is_refused():
    model = serial(L.Dense(5), Scale())
    vg = backprop.value_and_grad(model, losses.mse)
    with pytest.raises(TypeError, match=r"serial: unexpected keyword\(s\) \['scal'\]"):
        vg({"0": {}, "1": {}}, {"0": {}, "1": {}}, jnp.ones((4, 3)), jnp.ones((4, 5)),
           scal=SCALE)


def test_real_dropout_and_batchnorm():
    """The library's own stochastic and stateful blocks through value_and_grad."""
    model = serial(L.Dense(6), L.BatchNorm(), L.Relu(), L.Dropout(0.3), L.Dense(3))
    got, want = both(model, losses.mse, (8, 4), key=jax.random.PRNGKey(4))
    assert_same(got, want)
    assert not np.allclose(got[0][1]["1"]["mean"], 0.0)        # running statistics moved


# --------------------------------------------------------------------------- custom_vjp

def Doubled(layer) -> Layer:
    """``layer`` whose backward is deliberately twice the true one (to see which rule runs)."""
    def bwd(*a, **k):
        dp, dx = layer.bwd(*a, **k)
        return jax.tree.map(lambda g: 2 * g, dp), 2 * dx
    return layer._replace(bwd=bwd)


def grads_through(model, loss_of, x_shape, *, argnums=0, make_x=normal, **call):
    """``jax.value_and_grad`` of ``loss_of(m, state)(params, x)`` for ``m`` = the model through
    custom_vjp and the plain model (one compilation); also the two ``apply`` outputs."""
    bridged = backprop.custom_vjp(model)
    params, state, _ = init(model, x_shape)

    @jax.jit
    def run(params, x):
        out = [jax.value_and_grad(loss_of(m, state), argnums, has_aux=True)(params, x)
               for m in (bridged, model)]
        return out, bridged.apply(params, state, x, **call)[0], model.apply(params, state, x,
                                                                            **call)[0]
    return run(params, make_x(RNG(1), x_shape))


@pytest.mark.parametrize("train", [True, False])
def test_custom_vjp_grad_equals_autodiff(train):
    y = normal(RNG(2), (4, 3))

    def loss_of(m, state):
        return lambda p, x: (jnp.sum(jnp.sin(m.apply(p, state, x, train=train)[0]) * y), 0.0)

    [(v1, g1), (v2, g2)], y1, y2 = grads_through(mlp(L.Gelu), loss_of, (4, 3), argnums=(0, 1))
    assert abs(v1[0] - v2[0]) <= 1e-12 * abs(v2[0])
    assert_trees_close(g1, g2, rtol=1e-10, atol=1e-12)                                # params and x
    np.testing.assert_array_equal(y1, y2)
    assert backprop.custom_vjp(mlp(L.Gelu)).name == "custom_vjp(serial)"


def test_custom_vjp_runs_the_hand_rule_not_autodiff(monkeypatch):
    model = serial(L.Dense(4), L.Tanh(), Doubled(L.Dense(2)))

    def loss_of(m, state):
        return lambda p, x: (jnp.sum(m.apply(p, state, x)[0] ** 2), 0.0)

    with no_autodiff(monkeypatch, keep=("grad", "value_and_grad")):
        [(_, bridged), (_, plain)], _, _ = grads_through(model, loss_of, (4, 3))
    twice = jax.tree.map(lambda g: 2 * g, plain)
    # the doubled rule ran ...
    assert_trees_close(bridged["2"], twice["2"], rtol=1e-10, atol=1e-12)
    # ... and its 2·dx flowed back
    assert_trees_close(bridged["0"], twice["0"], rtol=1e-10, atol=1e-12)


def test_custom_vjp_with_integer_input_key_state_and_keywords():
    model = serial(L.Embedding(7, 4), Scale(), Noise(), L.Flatten(), L.Dense(3))
    k = jax.random.PRNGKey(9)

    def loss_of(m, state):
        def f(p, x):
            y, new_state = m.apply(p, state, x, key=k, train=True, scale=SCALE)
            return jnp.sum(y ** 2), new_state
        return f

    ints = lambda rng, shape: rng.integers(0, 7, shape)
    [((v1, s1), g1), ((v2, s2), g2)], y1, y2 = grads_through(
        model, loss_of, (4, 2), make_x=ints, key=k, train=True, scale=SCALE)
    np.testing.assert_array_equal(y1, y2)
    assert abs(v1 - v2) <= 1e-12 * abs(v2)
    assert_trees_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert int(s1["2"]["calls"]) == int(s2["2"]["calls"]) == 1


# --------------------------------------------------------------------------- training curves

def _blobs(n=256, dim=64, classes=10):
    """Generated classification data: ``classes`` Gaussian clusters in ``dim`` dimensions."""
    r = np.random.default_rng(0)
    y = r.integers(0, classes, n)
    x = r.normal(size=(classes, dim))[y] + 1.5 * r.normal(size=(n, dim))
    return jnp.asarray(x / 4, jnp.float32), jnp.asarray(y, jnp.int32)


def _curves(model, x, y, steps=100, lr=0.3, manual=True):
    """Loss curves of 100 SGD steps in float32 — plain autodiff, ``jax.grad`` through
    custom_vjp, and (``manual=True``) backprop.value_and_grad — from one compiled function."""
    loss = losses.softmax_cross_entropy_with_integer_labels

    params, state, _ = init(model, x.shape)

    @jax.jit
    def run(params, state):
        params, state = cast(params, jnp.float32), cast(state, jnp.float32)

        def through(m):
            f = lambda p: loss(m.apply(p, state, x, train=True)[0], y)
            return jax.value_and_grad(f)

        vg = backprop.value_and_grad(model, loss)
        runs = {"autodiff": through(model), "custom_vjp": through(backprop.custom_vjp(model))}
        if manual:
            runs["value_and_grad"] = lambda p: (lambda r: (r[0][0], r[1]))(vg(p, state, x, y))

        def step(ps, _):
            out = {n: runs[n](ps[n]) for n in runs}
            new = {n: jax.tree.map(lambda a, g: a - lr * g, ps[n], out[n][1]) for n in runs}
            return new, {n: out[n][0] for n in runs}
        return jax.lax.scan(step, {n: params for n in runs}, None, length=steps)[1]
    return {n: np.asarray(c) for n, c in run(params, state).items()}


def _assert_same_curves(curves):
    ref = curves["autodiff"]
    assert ref.dtype == np.float32 and ref[-1] < 0.7 * ref[0], "training did not progress"
    for name, c in curves.items():
        rel = np.max(np.abs(c - ref) / np.abs(ref))
        assert rel < 1e-5, f"{name}: loss curve differs from autodiff by {rel:.2e}"


def test_mlp_training_curves_match_in_float32():
    x, y = _blobs()
    _assert_same_curves(_curves(serial(L.Dense(32), L.Tanh(), L.Dense(10)), x, y))


def test_cnn_training_curves_match_in_float32():
    x, y = _blobs(128)
    model = serial(L.Conv(4, (3, 3)), L.Relu(), L.MaxPool((2, 2)), L.Flatten(), L.Dense(10))
    _assert_same_curves(_curves(model, x.reshape(-1, 8, 8, 1), y, manual=False))


# --------------------------------------------------------------------------- the lesson's example

def test_lesson_worked_example_four_ways():
    """examples/backprop_by_hand.py: chain rule, fnn.backprop, jax.grad and finite differences
    agree, and ∂L/∂w₁ equals the lesson's product written out here in NumPy."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "examples" / "backprop_by_hand.py"
    spec = importlib.util.spec_from_file_location("backprop_by_hand", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    w1, b1, w2, b2, x, y = 0.6, -0.2, 1.5, 0.3, 0.5, 1.0
    sig = lambda z: 1 / (1 + np.exp(-z))
    a1 = sig(w1 * x + b1)
    y_hat = sig(w2 * a1 + b2)
    dw1 = 2 * (y_hat - y) * y_hat * (1 - y_hat) * w2 * a1 * (1 - a1) * x
    ways = example.four_ways(example.make_params(w1, b1, w2, b2), x, y)
    for name, grads in ways.items():
        tol = 1e-7 if name == "finite diff" else 1e-12
        assert abs(float(grads["w1"]) - dw1) <= tol * abs(dw1), name
        for p in ("b1", "w2", "b2"):
            ref = float(ways["jax.grad"][p])
            assert abs(float(grads[p]) - ref) <= tol * abs(ref), (name, p)
