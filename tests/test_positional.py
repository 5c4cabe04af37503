"""Positional encodings against NumPy written from the formulas; rotary backward against jax.vjp;
decoding offsets equal to the full forward; error messages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers import PositionalEmbedding, SinusoidalPositions
from fnn.layers.positional import rope, rope_backward, sinusoidal


@pytest.mark.parametrize("features", [6, 7])
def test_sinusoidal_matches_formula(features):
    pe = np.asarray(sinusoidal(jnp.arange(5), features, base=100.0))
    ref = np.zeros((5, features))
    for p in range(5):
        for j in range(features):
            angle = p / 100.0 ** (2 * (j // 2) / features)
            ref[p, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    np.testing.assert_allclose(pe, ref, rtol=1e-12, atol=1e-12)


def np_rope(x, positions, base=10000.0):
    x = np.asarray(x, np.float64)
    d, out = x.shape[-1], np.empty(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            p = np.asarray(positions)[b, t] if np.ndim(positions) == 2 else positions[t]
            for i in range(d // 2):
                th = p * base ** (-2 * i / d)
                x1, x2 = x[b, t, :, i], x[b, t, :, i + d // 2]
                out[b, t, :, i] = x1 * np.cos(th) - x2 * np.sin(th)
                out[b, t, :, i + d // 2] = x2 * np.cos(th) + x1 * np.sin(th)
    return out


def test_rope_matches_formula_and_is_relative(rng):
    x = jnp.asarray(rng.normal(size=(2, 4, 3, 6)))
    pos = jnp.array([[0, 1, 2, 3], [5, 7, 11, 13]])
    np.testing.assert_allclose(rope(x, pos), np_rope(x, pos), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rope(x, jnp.arange(4)), np_rope(x, np.arange(4)), atol=1e-12)
    # <rope(q, m), rope(k, n)> depends on m - n only
    q, k = x[:1, :1], x[1:, :1]
    dot = lambda m, n: float(jnp.sum(rope(q, jnp.array([m])) * rope(k, jnp.array([n]))))
    assert abs(dot(3, 1) - dot(12, 10)) < 1e-12
    assert abs(dot(3, 1) - dot(1, 3)) > 1e-3


def test_rope_backward_matches_vjp(rng):
    x = jnp.asarray(rng.normal(size=(2, 5, 2, 4)))
    pos = jnp.arange(5) + 3
    dy = jnp.asarray(rng.normal(size=x.shape))
    _, vjp = jax.vjp(lambda x: rope(x, pos), x)
    np.testing.assert_allclose(rope_backward(dy, pos), vjp(dy)[0], rtol=1e-12, atol=1e-12)


def test_rope_errors():
    with pytest.raises(ValueError, match="even head_dim"):
        rope(jnp.ones((1, 2, 1, 3)), jnp.arange(2))
    with pytest.raises(ValueError, match=r"positions of shape \(3,\) do not match"):
        rope(jnp.ones((1, 2, 1, 4)), jnp.arange(3))


def test_positional_embedding_forward_backward(rng, monkeypatch):
    layer = PositionalEmbedding(6)
    params, state, out = layer.init(jax.random.PRNGKey(0), (2, 4, 3))
    x = jnp.asarray(rng.normal(size=(2, 4, 3)))
    y, _ = layer.apply(params, state, x)
    np.testing.assert_allclose(y, np.asarray(x) + np.asarray(params["w"])[None, :4])
    dy = jnp.asarray(rng.normal(size=(2, 4, 3)))
    _, vjp = jax.vjp(lambda p, x: layer.apply(p, state, x)[0], params, x)
    (ref_p, ref_x) = vjp(dy)
    monkeypatch.setattr(jax, "vjp", None)
    dp, dx = layer.backward(params, state, x, dy)
    np.testing.assert_allclose(dp["w"], ref_p["w"], atol=1e-12)
    np.testing.assert_allclose(dx, ref_x, atol=1e-12)
    assert out == (2, 4, 3)


@pytest.mark.parametrize("make", [lambda: PositionalEmbedding(6), SinusoidalPositions])
def test_decoding_continues_the_positions(make, rng):
    layer = make()
    params, state, _ = layer.init(jax.random.PRNGKey(0), (2, 5, 4))
    x = jnp.asarray(rng.normal(size=(2, 5, 4)))
    full, _ = layer.apply(params, state, x)
    a, s = layer.apply(params, state, x[:, :2], cache_len=6)
    b, s = layer.apply(params, s, x[:, 2:], cache_len=6)
    assert int(s["index"]) == 5
    np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), full, atol=1e-12)
    with pytest.raises(ValueError, match="decoding past the end of the cache: position 5 \\+ 2"):
        layer.apply(params, s, x[:, :2], cache_len=6)


def test_positional_errors():
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        PositionalEmbedding(0)
    layer = PositionalEmbedding(4)
    with pytest.raises(ValueError, match=r"expected input shape \(batch, time <= 4, features\)"):
        layer.init(jax.random.PRNGKey(0), (1, 5, 2))
    params, state, _ = layer.init(jax.random.PRNGKey(0), (1, 4, 2))
    with pytest.raises(ValueError, match="sequence length 5 exceeds max_len 4"):
        layer.apply(params, state, jnp.ones((1, 5, 2)))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, time, 2\)"):
        layer.apply(params, state, jnp.ones((1, 3, 3)))
    with pytest.raises(ValueError, match="backward does not run in decoding mode"):
        layer.backward(params, state, jnp.ones((1, 3, 2)), jnp.ones((1, 3, 2)), cache_len=4)
    with pytest.raises(ValueError, match=r"expected input shape \(batch, time, features\)"):
        SinusoidalPositions().init(jax.random.PRNGKey(0), (3, 4))
