"""fnn.models.GPT2: logits against a float64 NumPy GPT-2 written here from the paper's / Hugging
Face's equations (LayerNorm with eps, gelu_new, learned positions, tied head), the hand backward
against autodiff (with every dropout on), KV-cache greedy generation against recomputing the full
logits at each step, and the config.json round trip and errors."""
import math

import jax
import numpy as np
import pytest

from fnn.models import GPT2, generate, lm_loss, value_and_grad
from fnn.models import gpt2

from helpers import greedy_reference, no_autodiff, random_params, tree_rel_err

CFG = dict(vocab_size=23, n_positions=12, n_embd=8, n_layer=2, n_head=2, n_inner=12,
           layer_norm_epsilon=1e-4)


def gelu_new(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def numpy_gpt2(p, ids, n_head, eps):
    """GPT2LMHeadModel's forward in float64 NumPy (eval mode)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, t = ids.shape
    h = p["embed"]["w"][ids] + p["pos"]["w"][:t]
    causal = np.tril(np.ones((t, t), bool))
    blk = p["blocks"]
    for i in range(blk["attn"]["norm"]["scale"].shape[0]):
        at, ml = (jax.tree.map(lambda a, i=i: a[i], blk[n]) for n in ("attn", "mlp"))
        a = layer_norm(h, at["norm"]["scale"], at["norm"]["offset"], eps)
        q, k, v = (a @ at["mha"][n]["w"] + at["mha"][n]["b"] for n in "qkv")
        split = lambda z: z.reshape(b, t, n_head, -1).transpose(0, 2, 1, 3)    # (b, h, t, d)
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o = (w / w.sum(-1, keepdims=True)) @ v
        o = o.transpose(0, 2, 1, 3).reshape(b, t, -1)
        h = h + o @ at["mha"]["o"]["w"] + at["mha"]["o"]["b"]
        m = layer_norm(h, ml["norm"]["scale"], ml["norm"]["offset"], eps)
        f = ml["mlp"]
        h = h + gelu_new(m @ f["fc1"]["w"] + f["fc1"]["b"]) @ f["fc2"]["w"] + f["fc2"]["b"]
    h = layer_norm(h, p["norm"]["scale"], p["norm"]["offset"], eps)
    return h @ p["embed"]["w"].T if "head" not in p else h @ p["head"]["w"]


def ids(shape, vocab=23, seed=3):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def test_logits_match_numpy_reference():
    """GPT-2's tied head; eval mode (dropout configured, off). The untied head: test_llama.py."""
    x = ids((2, 7))
    model = GPT2(**CFG)
    params, state = random_params(model, x.shape)
    got = jax.jit(model.apply)(params, state, x)[0]
    want = numpy_gpt2(params, np.asarray(x), CFG["n_head"], CFG["layer_norm_epsilon"])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_hand_gradient_matches_autodiff_with_dropout(monkeypatch):
    """value_and_grad (hand rules) and the model's backward against jax.value_and_grad of the
    same loss, in training mode: embedding, attention and residual dropout all drawn from key."""
    model = GPT2(**CFG, resid_pdrop=0.2, attn_pdrop=0.2, embd_pdrop=0.3)
    x, y = ids((2, 6)), ids((2, 6), seed=4)
    params, state = random_params(model, x.shape, seed=5)
    kw = dict(key=jax.random.PRNGKey(7), train=True)
    real_vg = jax.value_and_grad

    def run(params):
        auto = real_vg(lambda p: lm_loss(model.apply(p, state, x, **kw)[0], y))(params)
        return auto, value_and_grad(model)(params, state, x, y, **kw), \
            lm_loss(model.apply(params, state, x)[0], y)
    with no_autodiff(monkeypatch):
        (l_auto, g_auto), ((l_hand, _), g_hand), l_eval = jax.jit(run)(params)
    assert abs(float(l_hand - l_auto)) < 1e-12
    assert tree_rel_err(g_hand, g_auto) < 1e-10
    assert abs(float(l_auto - l_eval)) > 1e-6        # dropout acted: training loss differs


def test_greedy_generation_equals_full_recompute():
    """generate's KV-cache greedy tokens equal argmax of the full causal forward re-run on the
    sequence so far at every step (one compiled forward over a fixed-length buffer: positions
    after t do not change logits at t); with eos_token_id, a row continues with pad after it."""
    model = GPT2(**CFG)
    prompt = ids((2, 3), seed=8)
    params, state = random_params(model, (2, 12), seed=0)
    params["pos"]["w"] = 4 * params["pos"]["w"]        # positions matter: no single repeated token
    seq = greedy_reference(model, params, state, prompt, 11)
    assert len(set(seq[0, 3:].tolist())) > 3
    eos = int(seq[0, -2])
    got = np.asarray(generate(model, params, prompt, 8, eos_token_id=eos, pad_token_id=99))
    for row, want in zip(got, seq):
        end = 3 + int(np.argmax(want[3:] == eos)) + 1 if eos in want[3:] else 11
        np.testing.assert_array_equal(row[:end], want[:end])
        assert (row[end:] == 99).all()
    assert end >= 10


def test_config_round_trip_and_unsupported_fields():
    cfg = gpt2.hf_config(GPT2(**CFG, activation_function="gelu", tie_word_embeddings=False,
                              resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.05,
                              eos_token_id=3))
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["n_inner"] == 12 and cfg["activation_function"] == "gelu"
    assert gpt2.hf_config(gpt2.from_hf_config(cfg)) == cfg
    extra = {**cfg, "n_ctx": 12, "summary_type": "cls_index", "transformers_version": "5"}
    assert gpt2.from_hf_config(extra) == gpt2.from_hf_config(cfg)
    aliased = {k: v for k, v in cfg.items() if k != "n_embd"} | {"hidden_size": 8}
    assert gpt2.hf_config(gpt2.from_hf_config(aliased)) == cfg
    assert gpt2.hf_input_shape(cfg) == (1, 8)
    for field, value in (("scale_attn_by_inverse_layer_idx", True),
                         ("scale_attn_weights", False), ("add_cross_attention", True),
                         ("reorder_and_upcast_attn", True),
                         ("activation_function", "mish")):
        with pytest.raises(ValueError, match=field):
            gpt2.from_hf_config({**cfg, field: value})
    with pytest.raises(ValueError, match="attn_pdrop"):
        GPT2(**CFG, attn_pdrop=0.2, resid_pdrop=0.1)
    with pytest.raises(ValueError, match="model_type must be 'gpt2'"):
        gpt2.from_hf_config({**cfg, "model_type": "llama"})
    with pytest.raises(ValueError, match="n_embd 8 must be a multiple of n_head 3"):
        GPT2(**{**CFG, "n_head": 3})
    with pytest.raises(TypeError, match="fnn.models.GPT2"):
        gpt2.hf_config(object())
