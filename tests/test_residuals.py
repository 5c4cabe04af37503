"""The residual channel of the Layer protocol: ``fwd``/``bwd`` through every combinator,
a user layer with only ``init/apply/backward`` inside them and under ``fit``, and one forward
per hand-derived step in ``fnn.backprop``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import backprop, losses, optim
from fnn.combinators import parallel, residual, serial, stack
from fnn.core import Layer, from_backward
from fnn.train import Loop, Step, fit

from helpers import assert_trees_close, no_autodiff

K = jax.random.PRNGKey(0)
F = 3


def normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def Scale() -> Layer:
    """A user layer written with ``init``/``apply``/``backward`` only: ``y = x ⊙ s``."""
    def init(key, input_shape):
        return {"s": 1.0 + normal(input_shape[-1:], 3) / 4}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        return x * params["s"][None, :], state

    def backward(params, state, x, dy, *, key=None, train=False):
        return {"s": jnp.sum(dy * x, axis=0)}, dy * params["s"][None, :]
    return from_backward(init, apply, backward, name="Scale")


def TanhDense(calls=None) -> Layer:
    """``y = tanh(x w)`` with residuals ``(x, y)``: ``bwd`` uses ``1 - y²`` and never reruns the
    forward. ``calls`` (a list) records each forward that runs, for counting."""
    def init(key, input_shape):
        return {"w": normal((input_shape[-1], input_shape[-1]), 4) / 2}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        if calls is not None:
            calls.append("apply")
        return jnp.tanh(x @ params["w"]), state

    def fwd(params, state, x, *, key=None, train=False):
        if calls is not None:
            calls.append("fwd")
        y = jnp.tanh(x @ params["w"])
        return y, state, (x, y)

    def bwd(params, state, res, dy, *, key=None, train=False):
        x, y = res
        dz = dy * (1 - y * y)
        return {"w": x.T @ dz}, dz @ params["w"].T
    return Layer(init, apply, fwd, bwd, "TanhDense")


MODELS = {
    "serial": lambda: serial(TanhDense(), Scale(), TanhDense()),
    "parallel": lambda: parallel(TanhDense(), Scale()),
    "parallel-concat": lambda: serial(parallel(Scale(), TanhDense(), concat=True),
                                      parallel(TanhDense(), Scale())),
    "residual": lambda: serial(residual(TanhDense()), residual(Scale())),
    "stack": lambda: stack(serial(TanhDense(), Scale()), 3),
    "stack-remat": lambda: stack(serial(TanhDense(), Scale()), 3, remat=True),
    "stack-of-user-layer": lambda: stack(Scale(), 2),
}


@pytest.mark.parametrize("name", MODELS)
def test_combinators_carry_residuals(name, monkeypatch):
    model = MODELS[name]()
    params, state, _ = model.init(K, (4, F))
    x = normal((4, F))
    y, new_state = model.apply(params, state, x)
    dy = jax.tree.map(lambda a: normal(a.shape, 2), y)
    _, vjp = jax.vjp(lambda p, x: model.apply(p, state, x)[0], params, x)
    ref = vjp(dy)

    def hand(params, x, dy):
        y2, s2, res = model.fwd(params, state, x)
        return y2, s2, res, model.bwd(params, state, res, dy), \
            model.backward(params, state, x, dy)
    with no_autodiff(monkeypatch):
        y2, s2, res, from_res, from_x = jax.jit(hand)(params, x, dy)
    assert_trees_close((y2, s2), (y, new_state), rtol=1e-12, atol=1e-14, what=f"{name} fwd")
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(res))
    assert_trees_close(from_res, ref, what=f"{name} bwd", rtol=1e-10, atol=1e-12)
    assert_trees_close(from_x, ref, what=f"{name} backward", rtol=1e-10, atol=1e-12)


def test_stack_stacks_residuals_along_the_copy_axis():
    x = normal((4, F))
    plain, remat = stack(TanhDense(), 5), stack(TanhDense(), 5, remat=True)
    params, state, _ = plain.init(K, (4, F))
    _, _, res = plain.fwd(params, state, x)
    assert [a.shape for a in jax.tree.leaves(res)] == [(5, 4, F), (5, 4, F)]   # (x, y) per copy
    _, _, res = remat.fwd(params, state, x)
    assert [a.shape for a in jax.tree.leaves(res)] == [(5, 4, F)]      # each copy's input only
    np.testing.assert_allclose(res[0], x)


def test_stack_checks_its_keywords():
    model = stack(TanhDense(), 2)
    params, state, _ = model.init(K, (4, F))
    for call in (lambda: model.apply(params, state, normal((4, F)), mask=1),
                 lambda: model.fwd(params, state, normal((4, F)), lengths=1)):
        with pytest.raises(TypeError, match=r"stack\(TanhDense, 2\): unexpected keyword"):
            call()


@pytest.mark.parametrize("wrap", ["value_and_grad", "custom_vjp"])
def test_the_hand_path_runs_each_forward_once(wrap):
    calls = []
    model = serial(TanhDense(calls), Scale(), TanhDense(calls))
    params, state, _ = model.init(K, (4, F))
    x, t = normal((4, F)), normal((4, F), 5)
    if wrap == "value_and_grad":
        (value, _, y), grads = backprop.value_and_grad(model, losses.mse, with_output=True)(
            params, state, x, t)
        np.testing.assert_allclose(y, model.apply(params, state, x)[0], rtol=1e-12)
        calls_in_step = calls[:2]
    else:
        hand = backprop.custom_vjp(model)
        value, grads = jax.value_and_grad(
            lambda p: losses.mse(hand.apply(p, state, x)[0], t))(params)
        calls_in_step = calls[:2]
    assert calls_in_step == ["fwd", "fwd"], calls
    ref_value, ref = jax.value_and_grad(lambda p: losses.mse(model.apply(p, state, x)[0], t))(
        params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    assert_trees_close(grads, ref, rtol=1e-10, atol=1e-12)


def test_a_user_layer_without_residuals_trains_under_fit_by_hand():
    """``Scale`` has no ``fwd``/``bwd``: in a serial under ``fit(grad="manual")`` it keeps its
    input as residual, and the run equals the autodiff run."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, F))
    y = np.tanh(x @ rng.standard_normal((F, F)))
    model = serial(TanhDense(), Scale(), TanhDense())
    runs = {g: fit(model, losses.mse, optim.sgd(0.1), (x, y), epochs=3, batch_size=8, key=K,
                   step=Step(grad=g), loop=Loop(shuffle=False, progress=False))
            for g in ("autodiff", "manual")}
    assert_trees_close(runs["manual"].train_state.params, runs["autodiff"].train_state.params,
                       rtol=1e-10, atol=1e-12)
    assert runs["manual"].history["loss"][-1] < runs["manual"].history["loss"][0]


def test_layers_hash_with_their_meta():
    """``meta`` is a read-only mapping; a Layer still hashes (caches keyed on layers work)."""
    from fnn.layers import LSTM, Embedding
    for layer in (LSTM(3), Embedding(5, 2), serial(TanhDense(), Scale())):
        assert hash(layer) == hash(layer)
    e = Embedding(5, 2)._replace(spec=None)          # identity by functions and meta
    assert hash(e._replace(meta=dict(e.meta))) == hash(e)
    assert e._replace(meta=dict(e.meta)) == e != e._replace(meta={})
