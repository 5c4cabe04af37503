"""Dense, Flatten, Embedding: forward against NumPy, hand-derived backward against jax.vjp and a
NumPy delta rule on several shapes (3-D and 4-D inputs too), default init, bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import initializers as inits
from fnn.layers import Dense, Embedding, Flatten
from fnn.layers.dense import dense, dense_backward

K = jax.random.PRNGKey(0)


def np_init(key, shape, dtype):
    """Key-dependent NumPy draws: no jax.random compile per new shape (they dominate run time)."""
    seed = np.asarray(jax.random.key_data(key)).tolist()
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def arr(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def assert_close(a, b, rtol=1e-12):
    assert np.shape(a) == np.shape(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-13)


def vjp_ref(layer, params, state, x, dy):
    _, vjp = jax.vjp(lambda p, x: layer.apply(p, state, x)[0], params, x)
    return vjp(dy)


# --------------------------------------------------------------------------- Dense

SHAPES = [((4, 5), 3), ((2, 3, 4), 6), ((2, 1, 3, 2), 1)]
IDS = ["2d", "3d", "4d"]


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape,features", SHAPES, ids=IDS)
def test_dense_forward_matches_numpy(shape, features, use_bias):
    layer = Dense(features, w_init=np_init, b_init=np_init, use_bias=use_bias)
    params, state, out = layer.init(K, shape)
    assert out == shape[:-1] + (features,) and state == {}
    assert jax.tree.map(jnp.shape, params) == (
        {"w": (shape[-1], features), "b": (features,)} if use_bias else {"w": (shape[-1], features)})
    x = arr(shape)
    y, _ = layer.apply(params, state, x)
    ref = np.einsum("...i,io->...o", np.asarray(x), np.asarray(params["w"]))
    if use_bias:
        ref = ref + np.asarray(params["b"])
    assert_close(y, ref)
    assert_close(dense(x, params["w"], params.get("b")), ref)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape,features", SHAPES, ids=IDS)
def test_dense_backward_matches_vjp_and_delta_rule(shape, features, use_bias):
    layer = Dense(features, w_init=np_init, b_init=np_init, use_bias=use_bias)
    params, state, out = layer.init(K, shape)
    x, dy = arr(shape), arr(out, 2)
    dp, dx = layer.backward(params, state, x, dy)
    ref_p, ref_x = vjp_ref(layer, params, state, x, dy)
    assert jax.tree.structure(dp) == jax.tree.structure(ref_p)
    for k in ref_p:
        assert_close(dp[k], ref_p[k], rtol=1e-10)
    assert_close(dx, ref_x, rtol=1e-10)
    xn, dyn, wn = np.asarray(x), np.asarray(dy), np.asarray(params["w"])
    lead = tuple(range(len(shape) - 1))
    assert_close(dp["w"], np.tensordot(xn, dyn, axes=(lead, lead)), rtol=1e-10)   # dW = aᵀδ
    assert_close(dx, dyn @ wn.T, rtol=1e-10)                                         # δWᵀ
    if use_bias:
        assert_close(dp["b"], dyn.sum(axis=lead), rtol=1e-10)
    dw, db, dx2 = dense_backward(x, params["w"], dy, use_bias)
    assert_close(dw, dp["w"]) and assert_close(dx2, dx)
    assert (db is None) == (not use_bias)


def test_dense_default_init_is_he_normal_with_zero_bias():
    fan_in = 500
    params, _, _ = Dense(256).init(K, (2, fan_in))                   # 128k draws
    w = np.asarray(params["w"])
    assert w.dtype == np.float64
    var = 2 / fan_in
    assert abs(w.mean()) < 0.05 * math.sqrt(var)
    assert abs(w.var() / var - 1) < 0.05
    assert abs(np.mean(np.abs(w) < math.sqrt(var)) - math.erf(1 / math.sqrt(2))) < 0.01  # normal
    np.testing.assert_array_equal(params["b"], np.zeros(256))


def test_dense_custom_initializers():
    params, _, _ = Dense(3, w_init=inits.ones, b_init=inits.constant(0.5)).init(K, (2, 4))
    np.testing.assert_array_equal(params["w"], np.ones((4, 3)))
    np.testing.assert_array_equal(params["b"], np.full(3, 0.5))
    p1, _, _ = Dense(3, w_init=np_init).init(jax.random.PRNGKey(1), (2, 4))
    p2, _, _ = Dense(3, w_init=np_init).init(jax.random.PRNGKey(2), (2, 4))
    assert not np.allclose(p1["w"], p2["w"])


def test_dense_accepts_numpy_integer_features():
    _, _, out = Dense(np.int64(3), w_init=inits.ones).init(K, (2, 4))
    assert out == (2, 3)


def test_dense_errors():
    layer = Dense(3, w_init=inits.ones)
    params, state, _ = layer.init(K, (4, 5))
    msg = r"Dense: expected input of shape \(batch, \.\.\., 5\), got shape "
    with pytest.raises(ValueError, match=msg + r"\(4, 6\)"):
        layer.apply(params, state, jnp.ones((4, 6)))
    with pytest.raises(ValueError, match=msg + r"\(4, 6\)"):
        layer.backward(params, state, jnp.ones((4, 6)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=msg + r"\(6,\)"):                        # no batch axis
        layer.apply(params, state, jnp.ones((6,)))
    with pytest.raises(TypeError, match=r"Dense: expected an array input, got list"):
        layer.apply(params, state, [[1.0] * 5])
    with pytest.raises(ValueError, match=r"Dense: expected input shape \(\.\.\., features\), "
                                         r"got \(\)"):
        layer.init(K, ())
    for bad in (0, -2, 2.0, "3", None):
        with pytest.raises(ValueError, match=r"Dense: features must be a positive int, got"):
            Dense(bad)


# --------------------------------------------------------------------------- Flatten

@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 5), (2, 1, 2, 3)])
def test_flatten_forward_and_backward(shape):
    layer = Flatten()
    params, state, out = layer.init(K, shape)
    assert params == {} and out == (shape[0], math.prod(shape[1:]))
    x = arr(shape)
    y, _ = layer.apply(params, state, x)
    np.testing.assert_array_equal(y, np.asarray(x).reshape(shape[0], -1))
    dy = arr(out, 2)
    dp, dx = layer.backward(params, state, x, dy)
    ref_p, ref_x = vjp_ref(layer, params, state, x, dy)
    assert dp == {} == ref_p
    np.testing.assert_array_equal(dx, ref_x)


# --------------------------------------------------------------------------- Embedding

VOCAB, FEAT = 7, 3


@pytest.mark.parametrize("ids", [
    [[0, 3, 3], [6, 0, 3], [1, 1, 1], [2, 5, 4]],                 # (4, 3) with repeats
    [[[0, 6, 6], [5, 5, 5]], [[1, 2, 3], [6, 6, 0]]],              # (2, 2, 3)
    [4, 4, 0, 1, 4],                                               # (5,)
], ids=["2d", "3d", "1d"])
def test_embedding_forward_and_backward(ids):
    ids = jnp.asarray(ids, jnp.int32)
    layer = Embedding(VOCAB, FEAT, w_init=np_init)
    params, state, out = layer.init(K, ids.shape)
    assert out == ids.shape + (FEAT,) and params["w"].shape == (VOCAB, FEAT)
    y, _ = layer.apply(params, state, ids)
    w = np.asarray(params["w"])
    np.testing.assert_array_equal(y, w[np.asarray(ids)])
    dy = arr(out, 2)
    dp, dx = layer.backward(params, state, ids, dy)
    assert dx is None
    _, vjp = jax.vjp(lambda p: layer.apply(p, state, ids)[0], params)
    np.testing.assert_allclose(dp["w"], vjp(dy)[0]["w"], rtol=1e-12, atol=1e-14)
    ref = np.zeros_like(w)                       # scatter-add, written as a loop
    for i, v in np.ndenumerate(np.asarray(ids)):
        ref[v] += np.asarray(dy)[i]
    np.testing.assert_allclose(dp["w"], ref, rtol=1e-12, atol=1e-14)


def test_embedding_default_init_is_standard_normal():
    params, _, _ = Embedding(2000, 64).init(K, (2, 3))          # 128k draws
    w = np.asarray(params["w"])
    assert abs(w.mean()) < 0.05 and abs(w.var() - 1) < 0.05


@pytest.mark.parametrize("bad,got", [(jnp.zeros((2, 3)), "float64"),
                                     (jnp.zeros((2, 3), jnp.float32), "float32"),
                                     ([[0, 1]], "list")], ids=["float64", "float32", "list"])
def test_embedding_rejects_non_integer_ids(bad, got):
    layer = Embedding(VOCAB, FEAT, w_init=inits.ones)
    params, state, _ = layer.init(K, (2, 3))
    with pytest.raises(TypeError, match=rf"Embedding: expected integer token ids, got {got}"):
        layer.apply(params, state, bad)
    with pytest.raises(TypeError, match=rf"Embedding: expected integer token ids, got {got}"):
        layer.backward(params, state, bad, jnp.ones((2, 3, FEAT)))
