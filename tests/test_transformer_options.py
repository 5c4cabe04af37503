"""TransformerBlock's options passed through (rotary base, grouped kv heads, no biases, norm
epsilon, gated MLP, any fnn activation) against a float64 NumPy Llama/GPT-2 block written from
the published equations (Hugging Face's ``LlamaDecoderLayer`` and ``GPT2Block``), and
GatedMLP against NumPy; hand backward against jax.vjp."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.activations import gelu_tanh, quick_gelu, swish
from fnn.layers import GatedMLP, TransformerBlock

from helpers import check_pair

C = math.sqrt(2 / math.pi)


def randomize(params, rng):
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(0.0, 0.5, p.shape)), params)


def np_silu(z):
    return z / (1 + np.exp(-z))


def np_gelu_tanh(z):
    return 0.5 * z * (1 + np.tanh(C * (z + 0.044715 * z ** 3)))


def np_rms(x, p, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * np.asarray(p["scale"])


def np_layer_norm(x, p, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["offset"])


def np_lin(x, p):
    return x @ np.asarray(p["w"]) + (np.asarray(p["b"]) if "b" in p else 0)


def np_rope(x, base):
    """HF ``apply_rotary_pos_emb``: x·cos + rotate_half(x)·sin, x: (b, t, h, d)."""
    t, d = x.shape[1], x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * inv[None]
    emb = np.concatenate([ang, ang], -1)[None, :, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def np_attention(x, p, heads, kv_heads, base=None):
    b, t, _ = x.shape
    q = np_lin(x, p["q"]).reshape(b, t, heads, -1)
    k = np_lin(x, p["k"]).reshape(b, t, kv_heads, -1)
    v = np_lin(x, p["v"]).reshape(b, t, kv_heads, -1)
    if base is not None:
        q, k = np_rope(q, base), np_rope(k, base)
    k, v = (np.repeat(a, heads // kv_heads, axis=2) for a in (k, v))     # HF repeat_kv
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return np_lin(np.einsum("bhts,bshd->bthd", a, v).reshape(b, t, -1), p["o"])


LLAMA = dict(causal=True, norm_type="rms", eps=1e-5, head_dim=4, num_kv_heads=2, rope=True,
             rope_base=500.0, mlp="gated", activation=swish, use_bias=False)


def test_llama_block_matches_numpy(rng):
    block = TransformerBlock(4, 12, **LLAMA)
    params, state, out = block.init(jax.random.PRNGKey(0), (2, 5, 8))
    params = randomize(params, rng)
    assert set(params["mlp"]["mlp"]) == {"gate", "up", "down"}
    assert "b" not in params["attn"]["mha"]["q"] and "b" not in params["mlp"]["mlp"]["up"]
    assert params["attn"]["mha"]["k"]["w"].shape == (8, 8)                 # 2 kv heads of 4
    assert params["attn"]["mha"]["q"]["w"].shape == (8, 16)
    x = rng.normal(size=(2, 5, 8))
    y = jax.jit(lambda p, x: block.apply(p, state, x)[0])(params, jnp.asarray(x))
    a, m = params["attn"], params["mlp"]
    h = x + np_attention(np_rms(x, a["norm"], 1e-5), a["mha"], 4, 2, base=500.0)
    z, f = np_rms(h, m["norm"], 1e-5), m["mlp"]
    ref = h + (np_silu(np_lin(z, f["gate"])) * np_lin(z, f["up"])) @ np.asarray(f["down"]["w"])
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    other = TransformerBlock(4, 12, **{**LLAMA, "rope_base": 10000.0})
    assert not np.allclose(other.apply(params, state, jnp.asarray(x))[0], y, atol=1e-3)


def test_gpt2_block_with_tanh_gelu_and_eps_matches_numpy(rng):
    block = TransformerBlock(2, 12, causal=True, activation=gelu_tanh, eps=1e-3)
    params, state, _ = block.init(jax.random.PRNGKey(0), (2, 5, 8))
    params = randomize(params, rng)
    x = rng.normal(size=(2, 5, 8))
    y = jax.jit(lambda p, x: block.apply(p, state, x)[0])(params, jnp.asarray(x))
    a, m = params["attn"], params["mlp"]
    h = x + np_attention(np_layer_norm(x, a["norm"], 1e-3), a["mha"], 2, 2)
    f = m["mlp"]
    ref = h + np_lin(np_gelu_tanh(np_lin(np_layer_norm(h, m["norm"], 1e-3), f["fc1"])), f["fc2"])
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mlp,norm", [("gated", "pre"), (GatedMLP(10, activation=gelu_tanh,
                                                                  use_bias=True), "post")])
def test_options_block_backward_matches_vjp(mlp, norm, rng, monkeypatch):
    block = TransformerBlock(4, 12, dropout=0.1, norm=norm, **{**LLAMA, "mlp": mlp})
    params, state, _ = block.init(jax.random.PRNGKey(0), (2, 5, 8))
    params = randomize(params, rng)
    x, dy = (jnp.asarray(rng.normal(size=(2, 5, 8))) for _ in range(2))
    check_pair(block, params, state, x, dy, monkeypatch, train=True, key=jax.random.PRNGKey(3))


@pytest.mark.parametrize("activation,np_act,use_bias", [(swish, np_silu, False),
                                                        (gelu_tanh, np_gelu_tanh, True)])
def test_gated_mlp_matches_numpy(activation, np_act, use_bias, rng, monkeypatch):
    layer = GatedMLP(7, 3, activation=activation, use_bias=use_bias)
    params, state, out = layer.init(jax.random.PRNGKey(0), (2, 4, 5))
    assert out == (2, 4, 3) and params["gate"]["w"].shape == (5, 7)
    assert ("b" in params["down"]) == use_bias
    params = randomize(params, rng)
    x, dy = jnp.asarray(rng.normal(size=(2, 4, 5))), jnp.asarray(rng.normal(size=out))
    xn, P = np.asarray(x), jax.tree.map(np.asarray, params)
    ref = np_lin(np_act(np_lin(xn, P["gate"])) * np_lin(xn, P["up"]), P["down"])
    np.testing.assert_allclose(layer.apply(params, state, x)[0], ref, rtol=1e-12, atol=1e-12)
    check_pair(layer, params, state, x, dy, monkeypatch)


def test_gated_mlp_errors():
    with pytest.raises(TypeError, match=r"GatedMLP: activation '<lambda>' has no \.vjp\(z, dy\)"):
        GatedMLP(4, activation=lambda z: z)
    with pytest.raises(ValueError, match="GatedMLP: hidden_features must be a positive int"):
        GatedMLP(0)
    layer = GatedMLP(4)
    params, _, _ = layer.init(jax.random.PRNGKey(0), (2, 5))
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 5\)"):
        layer.apply(params, {}, jnp.ones((2, 6)))
    assert GatedMLP(4, activation=quick_gelu) != layer
