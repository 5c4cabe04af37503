"""MultiHeadAttention against float64 NumPy written from the equations; its hand-derived backward
and residual pair (``fwd``/``bwd``) against ``apply``/``backward``/jax.vjp with autodiff patched
to raise; decoding errors; error messages. (Decoding with the cache against the full causal
forward, for all three kinds of positions, is in tests/test_gpt.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers import MultiHeadAttention, decode_step, init_cache

from helpers import check_pair, tree_rel_err, vjp_and_hand
from test_attention import np_attention, random_mask


def np_linear(x, p):
    return np.asarray(x) @ np.asarray(p["w"]) + (np.asarray(p["b"]) if "b" in p else 0)


def test_mha_matches_equations(rng):
    """Self-attention with grouped kv heads and given weights, against NumPy projections +
    per-head attention + output projection."""
    layer = MultiHeadAttention(4, head_dim=3, num_kv_heads=2, out_features=5)
    params, _, out_shape = layer.init(jax.random.PRNGKey(0), (2, 6, 8))
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    x = jnp.asarray(rng.normal(size=(2, 6, 8)))
    mask = random_mask(rng, (2, 1, 6, 6))
    y, _ = jax.jit(lambda p, x, m: layer.apply(p, {}, x, mask=m))(params, x, mask)
    q = np_linear(x, params["q"]).reshape(2, 6, 4, 3)
    k = np_linear(x, params["k"]).reshape(2, 6, 2, 3)
    v = np_linear(x, params["v"]).reshape(2, 6, 2, 3)
    ref = np_linear(np_attention(q, k, v, mask).reshape(2, 6, 12), params["o"])
    assert out_shape == (2, 6, 5)
    np.testing.assert_allclose(y, ref, rtol=1e-11, atol=1e-12)


def test_mha_cross_attention_matches_equations(rng):
    layer = MultiHeadAttention(2)
    params, _, out_shape = layer.init(jax.random.PRNGKey(0), ((2, 3, 4), (2, 5, 6)))
    x, ctx = jnp.asarray(rng.normal(size=(2, 3, 4))), jnp.asarray(rng.normal(size=(2, 5, 6)))
    y, _ = jax.jit(lambda p, x: layer.apply(p, {}, x))(params, (x, ctx))
    q = np_linear(x, params["q"]).reshape(2, 3, 2, 2)
    k = np_linear(ctx, params["k"]).reshape(2, 5, 2, 2)
    v = np_linear(ctx, params["v"]).reshape(2, 5, 2, 2)
    np.testing.assert_allclose(y, np_linear(np_attention(q, k, v).reshape(2, 3, 4), params["o"]),
                               rtol=1e-11, atol=1e-12)
    assert out_shape == (2, 3, 4)


@pytest.mark.parametrize("cross", [False, True])
def test_mha_backward_with_biases(cross, rng, monkeypatch):
    """use_bias=True (the sweep runs use_bias=False): the key bias's exact gradient is zero."""
    layer = MultiHeadAttention(2, causal=not cross, rope=not cross)
    shape = ((2, 4, 6), (2, 5, 3)) if cross else (2, 5, 8)
    params, _, out = layer.init(jax.random.PRNGKey(1), shape)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    x = tuple(jnp.asarray(rng.normal(size=s)) for s in shape) if cross else \
        jnp.asarray(rng.normal(size=shape))
    dy = jnp.asarray(rng.normal(size=out))
    ref, got = vjp_and_hand(lambda p, x: layer.apply(p, {}, x)[0], (params, x), dy,
                            lambda p, x, dy: layer.backward(p, {}, x, dy), monkeypatch)
    assert tree_rel_err(got, ref) < 1e-9
    if cross:    # without rope the key bias adds a constant to each row of logits
        assert np.abs(np.asarray(got[0]["k"]["b"])).max() < 1e-12 * np.abs(got[0]["k"]["w"]).max()


MHA_CASES = {   # name: (constructor kwargs, input shape, call: mask?, train?)
    "plain": ({}, (2, 5, 8), False, False),
    "plain-causal-mask-dropout": ({"causal": True, "dropout": 0.3, "num_kv_heads": 1,
                                   "rope": True}, (2, 6, 8), True, True),
    "plain-causal-long": ({"causal": True, "head_dim": 2}, (1, 64, 4), False, False),
    "chunked-causal-mask": ({"causal": True, "chunk_size": 3}, (2, 7, 8), True, False),
    "chunked-dropout-rope": ({"chunk_size": 4, "dropout": 0.2, "rope": True}, (2, 6, 8), False,
                             True),
    "cross-chunked": ({"chunk_size": 2, "out_features": 3}, ((2, 5, 6), (2, 3, 4)), False, False),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_residual_pair(case, rng, monkeypatch):
    """bwd(fwd) = backward = jax.vjp of apply; fwd's y and state = apply's; residuals are arrays
    (biases on; plain and chunked; causal, mask, dropout in training, rope, grouped kv heads,
    the plain form's causal query blocks, cross-attention)."""
    kwargs, shape, masked, train = MHA_CASES[case]
    layer = MultiHeadAttention(2, **kwargs)
    params, state, out = layer.init(jax.random.PRNGKey(1), shape)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    cross = not isinstance(shape[0], int)
    x = tuple(jnp.asarray(rng.normal(size=s)) for s in shape) if cross else \
        jnp.asarray(rng.normal(size=shape))
    kw = {"train": train, "key": jax.random.PRNGKey(7) if train else None}
    if masked:
        kw["mask"] = random_mask(rng, (shape[0], 1, shape[1], shape[1]))
    check_pair(layer, params, state, x, jnp.asarray(rng.normal(size=out)), monkeypatch, **kw)


def test_mha_fwd_refuses_decoding():
    layer = MultiHeadAttention(2, causal=True)
    params, state, _ = layer.init(jax.random.PRNGKey(0), (1, 3, 4))
    with pytest.raises(ValueError, match=r"MultiHeadAttention\(2\): fwd/backward does not run "
                                         r"in decoding mode"):
        layer.fwd(params, state, jnp.ones((1, 3, 4)), cache_len=4)
    res = layer.fwd(params, state, jnp.ones((1, 3, 4)))[2]
    with pytest.raises(ValueError, match=r"dy shape \(1, 3, 5\) differs from the output shape"):
        layer.bwd(params, state, res, jnp.ones((1, 3, 5)))


def test_mha_dropout_needs_key():
    layer = MultiHeadAttention(2, dropout=0.1)
    params, state, _ = layer.init(jax.random.PRNGKey(0), (1, 3, 4))
    with pytest.raises(ValueError, match="train=True needs a key"):
        layer.apply(params, state, jnp.ones((1, 3, 4)), train=True)
    assert layer.stochastic


def test_decode_errors(rng):
    layer = MultiHeadAttention(2, causal=True)
    params, state, _ = layer.init(jax.random.PRNGKey(0), (1, 3, 4))
    x = jnp.ones((1, 3, 4))
    cache = init_cache(layer, params, state, x, 4)
    assert cache["k"].shape == (1, 4, 2, 2) and int(cache["index"]) == 0
    _, cache = decode_step(layer, params, cache, x, 4)
    with pytest.raises(ValueError, match=r"decoding past the end of the cache: position 3 \+ 3"):
        decode_step(layer, params, cache, x, 4)
    step = jax.jit(lambda c, x: decode_step(layer, params, c, x, 4)[0])
    with pytest.raises(Exception, match="decoding past the end of the cache"):
        jax.block_until_ready(step(cache, x[:, :2]))
    with pytest.raises(ValueError, match="do not fit a cache of capacity 4"):
        decode_step(layer, params, {}, jnp.ones((1, 5, 4)), 4)
    with pytest.raises(ValueError, match="backward does not run in decoding mode"):
        layer.backward(params, state, x, x, cache_len=4)
    bidir = MultiHeadAttention(2)
    with pytest.raises(ValueError, match="needs causal self-attention"):
        bidir.apply(params, state, x, cache_len=4)


def test_mha_errors():
    with pytest.raises(ValueError, match="num_heads 4 must be a multiple of num_kv_heads 3"):
        MultiHeadAttention(4, num_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        MultiHeadAttention(3).init(jax.random.PRNGKey(0), (1, 2, 8))
    with pytest.raises(ValueError, match="rope needs an even head_dim"):
        MultiHeadAttention(2, head_dim=3, rope=True).init(jax.random.PRNGKey(0), (1, 2, 8))
    layer = MultiHeadAttention(2)
    params, state, _ = layer.init(jax.random.PRNGKey(0), (1, 2, 8))
    with pytest.raises(ValueError, match=r"input features 6/6 do not match"):
        layer.apply(params, state, jnp.ones((1, 2, 6)))
    with pytest.raises(ValueError, match=r"expected input shape \(batch, time, features\)"):
        layer.apply(params, state, jnp.ones((2, 8)))
