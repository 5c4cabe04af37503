"""fnn.models.Llama: logits against a float64 NumPy Llama written here from Hugging Face's
equations (RMSNorm, rotate_half RoPE with rope_theta, grouped-query attention with repeat_kv,
SwiGLU, untied and tied heads), the hand backward against autodiff, KV-cache greedy generation
against recomputing the full logits at each step, and the config.json round trip and errors."""
import math

import jax
import numpy as np
import pytest

from fnn.models import Llama, generate, lm_loss, value_and_grad
from fnn.models import llama

from helpers import greedy_reference, no_autodiff, random_params, tree_rel_err

CFG = dict(vocab_size=29, hidden_size=16, intermediate_size=20, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0)


def rms_norm(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def numpy_llama(p, ids, heads, kv_heads, eps, theta):
    """LlamaForCausalLM's forward in float64 NumPy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, t = ids.shape
    h = p["embed"]["w"][ids]
    d = p["blocks"]["attn"]["mha"]["q"]["w"].shape[-1] // heads
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    emb = np.concatenate([np.arange(t)[:, None] * inv_freq] * 2, -1)          # (t, d)
    cos, sin = np.cos(emb), np.sin(emb)
    causal = np.tril(np.ones((t, t), bool))
    blk = p["blocks"]
    for i in range(blk["attn"]["norm"]["scale"].shape[0]):
        at, ml = (jax.tree.map(lambda a, i=i: a[i], blk[n]) for n in ("attn", "mlp"))
        a = rms_norm(h, at["norm"]["scale"], eps)
        split = lambda z, n: z.reshape(b, t, n, d).transpose(0, 2, 1, 3)      # (b, n, t, d)
        q = split(a @ at["mha"]["q"]["w"], heads)
        k, v = split(a @ at["mha"]["k"]["w"], kv_heads), split(a @ at["mha"]["v"]["w"], kv_heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = (np.repeat(z, heads // kv_heads, axis=1) for z in (k, v))      # repeat_kv
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(d), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o = ((w / w.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        h = h + o @ at["mha"]["o"]["w"]
        m, f = rms_norm(h, ml["norm"]["scale"], eps), ml["mlp"]
        g = m @ f["gate"]["w"]
        h = h + (g / (1 + np.exp(-g)) * (m @ f["up"]["w"])) @ f["down"]["w"]
    h = rms_norm(h, p["norm"]["scale"], eps)
    return h @ p["embed"]["w"].T if "head" not in p else h @ p["head"]["w"]


def ids(shape, vocab=29, seed=3):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


@pytest.mark.parametrize("tie,kv", [(False, 2), (True, 4)])
def test_logits_match_numpy_reference(tie, kv):
    """Untied head with grouped-query attention (4 heads, 2 kv heads); tied head, 4 kv heads."""
    cfg = {**CFG, "tie_word_embeddings": tie, "num_key_value_heads": kv}
    model = Llama(**cfg)
    x = ids((2, 7))
    params, state = random_params(model, x.shape, scale=0.5)
    assert ("head" in params) == (not tie)
    got = jax.jit(model.apply)(params, state, x)[0]
    want = numpy_llama(params, np.asarray(x), 4, kv, cfg["rms_norm_eps"], cfg["rope_theta"])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_hand_gradient_matches_autodiff(monkeypatch):
    """value_and_grad (hand rules; GQA, rotary, SwiGLU, RMSNorm backward) against
    jax.value_and_grad of the same next-token loss."""
    model = Llama(**CFG)
    x, y = ids((2, 6)), ids((2, 6), seed=4)
    params, state = random_params(model, x.shape, seed=5, scale=0.5)
    real_vg = jax.value_and_grad

    def run(params):
        auto = real_vg(lambda p: lm_loss(model.apply(p, state, x)[0], y))(params)
        return auto, value_and_grad(model)(params, state, x, y)
    with no_autodiff(monkeypatch):
        (l_auto, g_auto), ((l_hand, _), g_hand) = jax.jit(run)(params)
    assert abs(float(l_hand - l_auto)) < 1e-12
    assert tree_rel_err(g_hand, g_auto) < 1e-10


def test_greedy_generation_equals_full_recompute():
    """generate's KV-cache greedy tokens (rotary positions from the cache index) equal argmax
    of the full causal forward over the sequence so far, at every step."""
    model = Llama(**CFG)
    prompt = ids((2, 4), seed=8)
    params, state = random_params(model, (2, 12), seed=2, scale=0.5)
    seq = greedy_reference(model, params, state, prompt, 12)
    assert len(set(seq[0, 4:].tolist())) > 2
    np.testing.assert_array_equal(generate(model, params, prompt, 8), seq)


def test_config_round_trip_and_unsupported_fields():
    cfg = llama.hf_config(Llama(**CFG, hidden_act="gelu", attention_bias=True, mlp_bias=True,
                                tie_word_embeddings=True, head_dim=6, eos_token_id=[2, 5]))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] == 6 and cfg["num_key_value_heads"] == 2 and cfg["rope_theta"] == 500
    assert llama.hf_config(llama.from_hf_config(cfg)) == cfg
    defaults = llama.hf_config(Llama())
    assert defaults["num_key_value_heads"] == 32 and defaults["head_dim"] == 128
    # transformers 5 writes rope_parameters instead of rope_theta
    v5 = {k: v for k, v in cfg.items() if k != "rope_theta"} | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "use_cache": True}
    assert llama.hf_config(llama.from_hf_config(v5)) == cfg
    assert llama.hf_input_shape(cfg) == (1, 8)
    for field, value in (("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                         ("attention_dropout", 0.1), ("hidden_act", "mish"),
                         ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5,
                                              "factor": 8.0})):
        with pytest.raises(ValueError, match=field):
            llama.from_hf_config({**cfg, field: value})
    with pytest.raises(ValueError, match="num_attention_heads 4 must be a multiple of "
                                         "num_key_value_heads 3"):
        Llama(**{**CFG, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="model_type must be 'llama'"):
        llama.from_hf_config({**cfg, "model_type": "gpt2"})
