"""Dropout and SpatialDropout: keep rate, expectation, determinism, modes, backward, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close

from fnn.combinators import serial
from fnn.layers import Dense, Dropout, SpatialDropout
from fnn.layers.dropout import dropout, dropout_backward


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_keep_rate_and_expectation_on_a_million_elements(rate, key):
    layer = Dropout(rate)
    x = jnp.full((1000, 1000), 2.0)
    y, state = jax.jit(lambda x, k: layer.apply({}, {}, x, key=k, train=True))(x, key)
    assert state == {}
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - (1 - rate)) < 0.01 * (1 - rate)
    # kept entries are exactly x / (1 - rate), the rest exactly 0: inverted dropout
    np.testing.assert_array_equal(np.asarray(y)[kept], 2.0 / (1 - rate))
    # the expectation is preserved: mean within 4 standard errors of x
    se = 2.0 * np.sqrt(rate / (1 - rate) / x.size)
    assert abs(float(jnp.mean(y)) - 2.0) < 4 * se


def test_same_key_same_mask_new_key_new_mask(key, rng):
    layer = Dropout(0.5)
    x = jnp.asarray(rng.normal(size=(8, 64)))
    a, _ = layer.apply({}, {}, x, key=key, train=True)
    b, _ = layer.apply({}, {}, x, key=key, train=True)
    c, _ = layer.apply({}, {}, x, key=jax.random.fold_in(key, 1), train=True)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.asarray(a != 0) != np.asarray(c != 0)) > 0.3


def test_identity_in_eval_and_at_rate_zero(key, rng):
    x = jnp.asarray(rng.normal(size=(3, 4)))
    for layer, k, train in ((Dropout(0.5), None, False), (Dropout(0.5), key, False),
                            (Dropout(0.0), key, True), (SpatialDropout(0.5), None, False)):
        xs = x.reshape(3, 2, 2) if layer.name.startswith("Spatial") else x
        y, _ = layer.apply({}, {}, xs, key=k, train=train)
        np.testing.assert_array_equal(y, xs)
        dp, dx = layer.backward({}, {}, xs, 2 * xs, key=k, train=train)
        assert dp == {}
        np.testing.assert_array_equal(dx, 2 * xs)


def test_rate_one_drops_everything(key):
    x = jnp.ones((4, 5))
    np.testing.assert_array_equal(Dropout(1.0).apply({}, {}, x, key=key, train=True)[0], 0.0)
    np.testing.assert_array_equal(Dropout(1.0).backward({}, {}, x, x, key=key, train=True)[1], 0.0)


@pytest.mark.parametrize("make,rate,shape", [(Dropout, 0.3, (5, 7)),
                                             (SpatialDropout, 0.4, (3, 4, 4, 6))])
def test_backward_reuses_the_mask_of_the_same_key(make, rate, shape, key, rng):
    layer = make(rate)
    x, dy = (jnp.asarray(rng.normal(size=shape)) for _ in range(2))
    y, _ = layer.apply({}, {}, x, key=key, train=True)
    _, dx = layer.backward({}, {}, x, dy, key=key, train=True)
    kept = np.asarray(y != 0)
    np.testing.assert_allclose(np.asarray(dx), np.where(kept, np.asarray(dy) / (1 - rate), 0.0),
                               rtol=1e-15)
    _, vjp = jax.vjp(lambda x: layer.apply({}, {}, x, key=key, train=True)[0], x)
    np.testing.assert_allclose(dx, vjp(dy)[0], rtol=1e-12)


def test_spatial_dropout_drops_whole_channels(key):
    rate = 0.5
    x = jnp.ones((50, 3, 4, 40))                 # 2000 (example, channel) pairs
    y, _ = SpatialDropout(rate).apply({}, {}, x, key=key, train=True)
    y = np.asarray(y)
    # one value per (example, channel), shared over all spatial positions
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1, :1, :], y.shape))
    per_channel = y[:, 0, 0, :]
    assert set(np.unique(per_channel)) == {0.0, 1 / (1 - rate)}
    assert abs((per_channel != 0).mean() - (1 - rate)) < 0.05
    np.testing.assert_array_equal(dropout(key, rate, x, broadcast_axes=(1, 2)), y)


def test_dropout_in_serial_gets_folded_keys_and_matches_vjp(key, rng):
    model = serial(Dense(4), Dropout(0.5), Dense(3))
    params, state, _ = model.init(jax.random.PRNGKey(1), (6, 5))
    x, dy = jnp.asarray(rng.normal(size=(6, 5))), jnp.asarray(rng.normal(size=(6, 3)))

    def both(params, x, dy):
        _, vjp = jax.vjp(lambda p, x: model.apply(p, state, x, key=key, train=True)[0], params, x)
        return vjp(dy), model.backward(params, state, x, dy, key=key, train=True)
    (ref_p, ref_x), (dp, dx) = jax.jit(both)(params, x, dy)
    assert_trees_close((dp, dx), (ref_p, ref_x), rtol=1e-10, atol=1e-14)


def test_plain_op_backward_equals_the_op_on_dy(key, rng):
    dy = jnp.asarray(rng.normal(size=(4, 6)))
    np.testing.assert_array_equal(dropout_backward(key, 0.25, dy), dropout(key, 0.25, dy))


def test_error_messages(key):
    x = jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"Dropout\(0.5\): train=True needs a key"):
        Dropout(0.5).apply({}, {}, x, train=True)
    with pytest.raises(ValueError, match=r"Dropout\(0.0\): train=True needs a key"):
        Dropout(0.0).backward({}, {}, x, x, train=True)
    with pytest.raises(ValueError, match=r"SpatialDropout\(0.5\): train=True needs a key"):
        SpatialDropout(0.5).apply({}, {}, jnp.ones((2, 3, 4)), train=True)
    with pytest.raises(ValueError, match=r"Dropout\(1.5\): rate must be a number in \[0, 1\]"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="dropout: rate must be a number in"):
        dropout(key, -0.1, x)
    with pytest.raises(ValueError, match=r"SpatialDropout\(0.5\): expected input of rank >= 3 "
                                          r"\(batch, \*spatial, channels\), got shape \(4, 5\)"):
        SpatialDropout(0.5).init(key, (4, 5))
    with pytest.raises(TypeError, match="Dropout.*expected an array input, got list"):
        Dropout(0.5).apply({}, {}, [1.0, 2.0], key=key, train=True)
    with pytest.raises(ValueError, match=r"Dropout\(0.5\): dy shape \(4, 1\) differs"):
        Dropout(0.5).backward({}, {}, x, jnp.ones((4, 1)), key=key, train=True)
