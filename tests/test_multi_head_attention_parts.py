"""MultiHeadAttention's module-level pieces on their own: ``project``, ``attend``, ``output`` and
the cache helpers against float64 NumPy written from the equations; each ``*_backward`` against
jax.vjp of its forward piece (autodiff patched to raise while the hand rule runs); ``forward``
in decoding mode against the full causal forward. The layer as a whole is in
tests/test_multi_head_attention.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import initializers as inits
from fnn.layers import multi_head_attention as mha

from helpers import tree_rel_err, vjp_and_hand
from test_attention import np_attention, random_mask


def config(num_heads=4, kv_heads=2, **kw):
    return mha.Config("MHA", num_heads, kv_heads, **{"w_init": inits.glorot_uniform(), **kw})


def random_params(rng, cfg, shape):
    params, _, _ = mha.init_params(cfg, jax.random.PRNGKey(0), shape)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)


def np_linear(x, p):
    return np.asarray(x) @ np.asarray(p["w"]) + (np.asarray(p["b"]) if "b" in p else 0)


def np_rope(x, pos, base=10000.0):
    """Half-split rotation by ``θ_i = p·base^(-2i/d)`` (the positional module's equations)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    ang = np.asarray(pos, np.float64)[:, None] * base ** (-2.0 * np.arange(d // 2) / d)
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


PROJECT_CASES = {   # name: (config kwargs, x shape, context shape or None (self-attention))
    "fused": ({}, (2, 5, 8), None),
    "fused-rope-nobias": ({"rope": True, "use_bias": False}, (2, 5, 8), None),
    "cross": ({"head_dim": 2}, (2, 3, 6), (2, 4, 5)),
    "cross-rope": ({"head_dim": 4, "rope": True}, (2, 3, 6), (2, 4, 5)),
}


def project_inputs(rng, case):
    kw, xs, cs = PROJECT_CASES[case]
    cfg = config(**kw)
    params = random_params(rng, cfg, xs if cs is None else (xs, cs))
    x = jnp.asarray(rng.normal(size=xs))
    ctx = x if cs is None else jnp.asarray(rng.normal(size=cs))
    q_pos, k_pos = jnp.arange(3, 3 + x.shape[1]), jnp.arange(ctx.shape[1])
    return cfg, params, x, ctx, q_pos, k_pos, cs is None


@pytest.mark.parametrize("case", list(PROJECT_CASES))
def test_project_matches_equations(case, rng):
    cfg, params, x, ctx, q_pos, k_pos, fused = project_inputs(rng, case)
    q, k, v = mha.project(cfg, params, x, ctx, q_pos, k_pos, fused)
    (b, t, _), s = x.shape, ctx.shape[1]
    d = params["q"]["w"].shape[1] // 4
    want = [np_linear(x, params["q"]).reshape(b, t, 4, d),
            np_linear(ctx, params["k"]).reshape(b, s, 2, d),
            np_linear(ctx, params["v"]).reshape(b, s, 2, d)]
    if cfg.rope:
        want[0], want[1] = np_rope(want[0], q_pos), np_rope(want[1], k_pos)
    for got, ref in zip((q, k, v), want):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(PROJECT_CASES))
def test_project_backward_is_its_vjp(case, rng, monkeypatch):
    cfg, params, x, ctx, q_pos, k_pos, fused = project_inputs(rng, case)
    outs = mha.project(cfg, params, x, ctx, q_pos, k_pos, fused)
    dq, dk, dv = (jnp.asarray(rng.normal(size=o.shape)) for o in outs)
    qkv = {n: params[n] for n in "qkv"}

    def f(p, x, ctx):
        return mha.project(cfg, p, x, x if fused else ctx, q_pos, k_pos, fused)

    def hand(p, x, ctx, dout):
        grads, dx, dctx = mha.project_backward(cfg, p, x, x if fused else ctx, *dout, q_pos,
                                               k_pos, fused)
        return grads, dx, (jnp.zeros_like(ctx) if fused else dctx)
    ref, got = vjp_and_hand(f, (qkv, x, ctx), (dq, dk, dv), hand, monkeypatch)
    assert tree_rel_err(got, ref) < 1e-12
    if fused:          # self-attention: the whole input gradient is in dx
        assert mha.project_backward(cfg, params, x, x, dq, dk, dv, q_pos, k_pos, True)[2] == 0


def test_output_and_its_backward(rng, monkeypatch):
    cfg = config(out_features=5)
    params = random_params(rng, cfg, (2, 3, 8))
    a = jnp.asarray(rng.normal(size=(2, 3, 4, 2)))
    np.testing.assert_allclose(mha.output(params, a),
                               np_linear(np.asarray(a).reshape(2, 3, 8), params["o"]),
                               rtol=1e-12, atol=1e-12)
    dy = jnp.asarray(rng.normal(size=(2, 3, 5)))
    ref, got = vjp_and_hand(lambda p, a: mha.output({"o": p}, a), (params["o"], a), dy,
                            lambda p, a, dy: mha.output_backward(cfg, {"o": p}, a, dy),
                            monkeypatch)
    assert tree_rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("kw", [{}, {"causal": True, "chunk_size": 2}])
def test_attend_and_its_backward(kw, rng, monkeypatch):
    """Grouped heads, a mask with an empty row, causal and chunked; q_offset shifts the causal
    diagonal."""
    cfg = config(**kw)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 3)))
    k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 3))) for _ in range(2))
    mask = random_mask(rng, (2, 1, 5, 7))
    a, res = mha.attend(cfg, q, k, v, mask, q_offset=2)
    np.testing.assert_allclose(a, np_attention(q, k, v, mask, causal=cfg.causal, q_offset=2),
                               rtol=1e-11, atol=1e-12)
    da = jnp.asarray(rng.normal(size=a.shape))
    ref, got = vjp_and_hand(lambda q, k, v: mha.attend(cfg, q, k, v, mask)[0], (q, k, v), da,
                            lambda q, k, v, da: mha.attend_backward(
                                cfg, mha.attend(cfg, q, k, v, mask)[1], da, mask),
                            monkeypatch)
    assert tree_rel_err(got, ref) < 1e-11


def test_attend_dropout_needs_key():
    q = jnp.ones((1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"MHA: train=True needs a key for attention dropout"):
        mha.attend(config(2, 2, dropout=0.5), q, q, q, train=True)
    assert mha.attention_options(config(2, 2, dropout=0.5), None, False)["dropout_rate"] == 0.0


def test_cache_open_and_append(rng):
    cfg = config(causal=True)
    params = random_params(rng, cfg, (2, 3, 8))
    x = jnp.asarray(rng.normal(size=(2, 3, 8)))
    cache = mha.open_cache(cfg, params, {}, x, 6)
    assert cache["k"].shape == cache["v"].shape == (2, 6, 2, 2) and int(cache["index"]) == 0
    k, v = (jnp.asarray(rng.normal(size=(2, 3, 2, 2))) for _ in range(2))
    kc, vc, new = mha.append_to_cache({**cache, "index": jnp.asarray(2, jnp.int32)}, k, v)
    want_k, want_v = np.zeros((2, 6, 2, 2)), np.zeros((2, 6, 2, 2))
    want_k[:, 2:5], want_v[:, 2:5] = k, v
    np.testing.assert_array_equal(kc, want_k)
    np.testing.assert_array_equal(vc, want_v)
    assert new["k"] is kc and new["v"] is vc and int(new["index"]) == 5
    with pytest.raises(ValueError, match=r"MHA: cache_len must be a positive int, got 0"):
        mha.open_cache(cfg, params, {}, x, 0)
    with pytest.raises(ValueError, match=r"MHA: expected a cache \{'k', 'v': \(2, 4, 2, 2\)"):
        mha.open_cache(cfg, params, cache, x, 4)
    with pytest.raises(ValueError, match=r"MHA: decoding past the end of the cache: position 5"):
        mha.open_cache(cfg, params, new, x, 6)


@pytest.mark.parametrize("rope", [False, True])
def test_forward_decoding_equals_full_forward(rope, rng):
    """Three steps through the cache (2, 1 and 3 positions) give the rows of one causal
    forward over the 6 positions; the cache holds the projected keys and values."""
    cfg = config(causal=True, rope=rope)
    params = random_params(rng, cfg, (2, 6, 8))
    x = jnp.asarray(rng.normal(size=(2, 6, 8)))
    full, res, _ = mha.forward(cfg, params, x)
    cache, ys = {}, []
    for a, b in ((0, 2), (2, 3), (3, 6)):
        y, _, cache = mha.forward(cfg, params, x[:, a:b], cache=cache, cache_len=8)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(cache["k"][:, :6], res["att"]["k"], rtol=1e-12, atol=1e-12)
    assert int(cache["index"]) == 6 and float(jnp.abs(cache["k"][:, 6:]).max()) == 0


def test_backward_is_vjp_of_forward(rng, monkeypatch):
    """``backward`` of ``forward``'s residuals against jax.vjp of ``forward``'s output
    (cross-attention with rope on the queries' and keys' own positions)."""
    cfg = config(rope=True, head_dim=4, out_features=3)
    shape = ((2, 3, 6), (2, 4, 5))
    params = random_params(rng, cfg, shape)
    x = tuple(jnp.asarray(rng.normal(size=s)) for s in shape)
    dy = jnp.asarray(rng.normal(size=(2, 3, 3)))
    ref, got = vjp_and_hand(lambda p, x: mha.forward(cfg, p, x)[0], (params, x), dy,
                            lambda p, x, dy: mha.backward(cfg, p, mha.forward(cfg, p, x)[1], dy),
                            monkeypatch)
    assert tree_rel_err(got, ref) < 1e-10
    with pytest.raises(ValueError, match=r"MHA: dy shape \(2, 3, 4\) differs from the output "
                                         r"shape \(2, 3, 3\)"):
        mha.backward(cfg, params, mha.forward(cfg, params, x)[1], jnp.ones((2, 3, 4)))
