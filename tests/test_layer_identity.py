"""Structural identity and kind: layers built by the same constructor from equal arguments are
equal and hash alike (compiled functions are reused by that key); ``kind`` names the
constructor; a changed function drops the identity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.core import Layer, constructor, from_backward
from fnn.layers import (LSTM, Conv, Dense, Dropout, Embedding, LayerNorm, MultiHeadAttention,
                        Relu, TransformerBlock, parallel, residual, serial, stack)
from fnn.models import GPT


@pytest.mark.parametrize("make", [
    lambda: Dense(8), lambda: Dense(8, use_bias=False), lambda: Conv(4, (3, 3)),
    lambda: serial(Dense(8), Relu(), ("head", Dense(2))), lambda: parallel(Dense(2), Dense(3)),
    lambda: residual(serial(LayerNorm(), Dense(4))), lambda: stack(Dense(4), 3, remat=True),
    lambda: TransformerBlock(2, 16, causal=True), lambda: GPT(50, 16, 2, 2),
    lambda: LSTM(3, return_carry=True), lambda: Dropout(0.5),
])
def test_equal_construction_equal_layer(make):
    a, b = make(), make()
    assert a is not b and a == b and hash(a) == hash(b)
    assert len({a, b}) == 1


@pytest.mark.parametrize("a, b", [
    (lambda: Dense(8), lambda: Dense(9)),
    (lambda: Dense(8), lambda: Dense(8, use_bias=False)),
    (lambda: serial(Dense(8), Relu()), lambda: serial(Relu(), Dense(8))),
    (lambda: serial(Dense(8)), lambda: serial(("fc", Dense(8)))),
    (lambda: parallel(Dense(2), concat=True), lambda: parallel(Dense(2), concat=1)),
    (lambda: stack(Dense(4), 3), lambda: stack(Dense(4), 3, remat=True)),
    (lambda: Dropout(0.5), lambda: Dropout(0.25)),
    (lambda: MultiHeadAttention(2), lambda: MultiHeadAttention(2, causal=True)),
])
def test_different_construction_different_layer(a, b):
    assert a() != b()


def test_defaults_are_filled_in():
    assert Dense(8) == Dense(8, use_bias=True) == Dense(features=8)


def test_kind_is_the_constructor_and_name_is_free():
    assert [l.kind for l in (Dense(3), Relu(), serial(Dense(3)), stack(Dense(3), 2),
                             residual(Dense(3)), GPT(10, 8, 2, 1), Embedding(4, 2))] == \
        ["Dense", "Relu", "serial", "stack", "residual", "GPT", "Embedding"]
    renamed = Dense(3)._replace(name="my head")      # a display name changes nothing
    assert renamed.kind == "Dense" and renamed == Dense(3)


def test_changed_function_drops_identity():
    d = Dense(3)
    other = d._replace(apply=lambda p, s, x, **kw: (x, s))
    assert other.spec is None and other != d and other == other


def test_unhashable_arguments_compare_by_identity():
    @constructor
    def Shift(offset):
        return from_backward(lambda k, s: ({}, {}, s), lambda p, s, x, **kw: (x + offset, s),
                             lambda p, s, x, dy, **kw: ({}, dy), name="Shift")
    a = jnp.ones(3)
    assert Shift(a) == Shift(a) and Shift(a) != Shift(jnp.ones(3))
    assert Shift(1.0) == Shift(1.0) and Shift(1.0) != Shift(1)      # values keep their type
    assert Shift(a).kind == "Shift"


def test_user_layer_without_spec_compares_by_functions():
    init = lambda k, s: ({}, {}, s)
    apply = lambda p, s, x, **kw: (2 * x, s)
    back = lambda p, s, x, dy, **kw: ({}, 2 * dy)
    a = from_backward(init, apply, back, name="double")
    assert a.spec is None and a.kind == "layer"
    assert a == a and a != from_backward(init, apply, back, name="double")  # new fwd closure
    assert Layer(*a[:4]) == Layer(*a[:4])


def test_old_positional_form_is_refused():
    init = lambda k, s: ({}, {}, s)
    with pytest.raises(TypeError, match="from_backward"):
        Layer(init, lambda p, s, x, **kw: (x, s), lambda p, s, x, dy, **kw: ({}, dy), "old")


def test_from_backward_residual_is_the_input():
    """The three-function form: ``fwd`` keeps ``x``; ``backward`` (derived) equals the given
    one, and both equal ``jax.vjp`` of ``apply``."""
    init = lambda k, s: ({"w": jnp.full(s[-1:], 3.0)}, {}, s)
    apply = lambda p, s, x, **kw: (jnp.sin(x) * p["w"][None], s)
    back = lambda p, s, x, dy, **kw: ({"w": jnp.sum(dy * jnp.sin(x), 0)},
                                      dy * jnp.cos(x) * p["w"][None])
    layer = from_backward(init, apply, back)
    params, state, _ = layer.init(None, (2, 3))
    x = jnp.arange(6.0).reshape(2, 3)
    y, _, res = layer.fwd(params, state, x)
    np.testing.assert_array_equal(res, x)
    dy = jnp.linspace(-1, 1, 6).reshape(2, 3)
    ref = jax.vjp(lambda p, x: layer.apply(p, state, x)[0], params, x)[1](dy)
    got = layer.backward(params, state, x, dy)
    np.testing.assert_allclose(got[0]["w"], ref[0]["w"], rtol=1e-12)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)


def test_identity_is_a_cache_key():
    """A cache keyed on layers finds the entry for an equal, freshly built model."""
    cache = {serial(Dense(4), Relu()): "compiled"}
    assert cache[serial(Dense(4), Relu())] == "compiled"
    assert fnn.serial is serial
