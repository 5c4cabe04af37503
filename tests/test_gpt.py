"""The small GPT: hand-derived backward, residual pair and training step against autodiff,
KV-cache decoding against the full causal forward (learned, sinusoidal, rotary positions),
sampling (greedy, and top-k keeping exactly k tokens) against the full forward, error
messages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import backprop, losses
from fnn.activations import quick_gelu
from fnn.core import cast
from fnn.models import GPT, decode_step, init_cache, sample, value_and_grad

from helpers import no_autodiff, tree_rel_err


def tokens(shape, vocab=11, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


@pytest.mark.parametrize("tie,unroll,depth", [(True, False, 2), (False, True, 2)])
def test_hand_gradients_match_autodiff(tie, unroll, depth, monkeypatch):
    """GPT.backward, value_and_grad and jax.grad through backprop.custom_vjp(GPT) (hand rules,
    autodiff patched to raise except the grad that drives the custom_vjp) against
    jax.value_and_grad of the same loss, in training mode with dropout."""
    model = GPT(11, 8, 2, depth, 16, 8, tie=tie, dropout=0.1, num_kv_heads=1)
    params, state, out = model.init(jax.random.PRNGKey(0), (2, 6))
    assert out == (2, 6, 11) and ("head" in params) == (not tie)
    x, y = tokens((2, 6)), tokens((2, 6), seed=2)
    key, real_vg = jax.random.PRNGKey(4), jax.value_and_grad
    kw = dict(key=key, train=True)
    loss = losses.softmax_cross_entropy_with_integer_labels

    def run(params):
        logits = model.apply(params, state, x, **kw)[0]
        auto = real_vg(lambda p: loss(model.apply(p, state, x, **kw)[0], y))(params)
        bridged = real_grad(lambda p: loss(bridge.apply(p, state, x, **kw)[0], y))(params)
        return auto, value_and_grad(model, unroll=unroll)(params, state, x, y, **kw), \
            model.backward(params, state, x, loss.grad(logits, y), **kw), bridged
    bridge, real_grad = backprop.custom_vjp(model), jax.grad
    with no_autodiff(monkeypatch):
        (l_auto, g_auto), ((l_hand, _), g_hand), (g_back, dx), g_bridge = jax.jit(run)(params)
    assert dx is None
    assert abs(float(l_hand - l_auto)) < 1e-12
    for g in (g_hand, g_back, g_bridge):
        assert tree_rel_err(g, g_auto) < 1e-9


@pytest.mark.parametrize("tie,train", [(True, True), (False, False)])
def test_residual_pair(tie, train, monkeypatch):
    """fwd's logits and state equal apply's; its residuals are arrays; bwd of them equals
    backward and jax.vjp of apply (with a mask keyword reaching the blocks)."""
    model = GPT(11, 8, 2, 2, 16, 8, tie=tie, dropout=0.2, positions="rope")
    params, state, _ = model.init(jax.random.PRNGKey(0), (2, 5))
    x = tokens((2, 5))
    kw = dict(key=jax.random.PRNGKey(1) if train else None, train=train,
              mask=jnp.asarray(np.random.default_rng(0).random((2, 1, 5, 5)) > 0.3))
    dy = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 11))
    real_vjp, not_arrays = jax.vjp, []

    def run(params):
        y, s = model.apply(params, state, x, **kw)
        y2, s2, res = model.fwd(params, state, x, **kw)
        # as fwd returns them (at trace time a Python number or NumPy array still shows)
        not_arrays.extend(type(a).__name__ for a in jax.tree.leaves(res)
                          if not isinstance(a, jax.Array))
        ref = real_vjp(lambda p: model.apply(p, state, x, **kw)[0], params)[1](dy)[0]
        return y, y2, s2, model.bwd(params, state, res, dy, **kw), ref, \
            model.backward(params, state, x, dy, **kw)
    with no_autodiff(monkeypatch):
        y, y2, s2, (got, dx), ref, (back, _) = jax.jit(run)(params)
    assert not not_arrays, f"residuals include {not_arrays}"
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)
    assert dx is None and jax.tree.structure(s2) == jax.tree.structure(state)
    assert tree_rel_err(got, ref) < 1e-9 and tree_rel_err(got, back) < 1e-12


def test_post_norm_and_activation_options(monkeypatch):
    """norm="post" (GPT-1: post-norm blocks, no final norm), quick GELU, eps: value_and_grad
    (hand rules) against jax.value_and_grad."""
    model = GPT(11, 8, 2, 2, 16, 8, norm="post", activation=quick_gelu, eps=1e-6)
    params, state, _ = model.init(jax.random.PRNGKey(0), (2, 6))
    assert "norm" not in params and set(params["blocks"]) == {"attn", "norm1", "mlp", "norm2"}
    assert model != GPT(11, 8, 2, 2, 16, 8, norm="post", eps=1e-6)
    x, y, real_vg = tokens((2, 6)), tokens((2, 6), seed=2), jax.value_and_grad
    loss = losses.softmax_cross_entropy_with_integer_labels

    def run(params):
        return real_vg(lambda p: loss(model.apply(p, state, x)[0], y))(params), \
            value_and_grad(model)(params, state, x, y)
    with no_autodiff(monkeypatch):
        (l_auto, g_auto), ((l_hand, _), g_hand) = jax.jit(run)(params)
    assert abs(float(l_hand - l_auto)) < 1e-12 and tree_rel_err(g_hand, g_auto) < 1e-9


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope"])
def test_decoding_equals_full_forward(positions):
    """Token by token (after a 3-token prefill for one of them): the logits equal the full causal
    forward's rows (float32, 1e-5). Grouped kv heads; the sinusoidal model has an untied head."""
    model = GPT(13, 8, 4, 1, 16, 12, positions=positions, num_kv_heads=2,
                tie=positions != "sinusoidal")
    params, state, _ = model.init(jax.random.PRNGKey(0), (2, 8))
    params = cast(params, jnp.float32)
    x = tokens((2, 8), 13)
    full = jax.jit(lambda p: model.apply(p, state, x)[0])(params)
    step = jax.jit(lambda p, c, t: decode_step(model, p, c, t, 10))
    cache = init_cache(model, params, state, x[:, :1], 10)
    first = 3 if positions == "learned" else 1          # a multi-token prefill once
    logits, cache = step(params, cache, x[:, :first])
    rows = [logits]
    for t in range(first, 8):
        logits, cache = step(params, cache, x[:, t:t + 1])
        rows.append(logits)
    got = jnp.concatenate(rows, axis=1)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)


def test_sampling_against_the_full_forward():
    model = GPT(7, 8, 2, 1, 16, 16, positions="rope", remat=True)
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, 4))
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]])
    greedy = sample(model, params, state, jax.random.PRNGKey(0), prompt, 5, temperature=0.0)
    assert greedy.shape == (2, 8)
    np.testing.assert_array_equal(greedy[:, :3], prompt)
    forward = jax.jit(lambda t: model.apply(params, state, t)[0])
    np.testing.assert_array_equal(greedy[:, 3:], jnp.argmax(forward(greedy)[:, 2:-1], axis=-1))
    drawn = sample(model, params, state, jax.random.PRNGKey(2), prompt, 5, temperature=2.0,
                   top_k=3)
    logits = forward(drawn)
    top3 = jax.lax.top_k(logits[:, 2:-1], 3)[1]                       # (2, 5, 3)
    assert bool(jnp.all(jnp.any(top3 == drawn[:, 3:, None], axis=-1)))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_top_k_keeps_exactly_k_tokens(k):
    """400 copies of one prompt, one step at a high temperature (near-uniform over what is kept):
    the set of drawn tokens is exactly the k most likely under the full forward — keeping k − 1
    tokens misses one, keeping k + 1 draws an extra one (each of the ≤ 7 candidates appears
    with probability > 1 − (1 − 1/7)^400 ≈ 1 − 1e-27 when kept)."""
    model = GPT(7, 8, 2, 1, 16, 8)
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, 4))
    prompt = jnp.tile(jnp.array([[1, 2, 3]]), (400, 1))
    drawn = sample(model, params, state, jax.random.PRNGKey(3), prompt, 1, temperature=1e3,
                   top_k=k)[:, -1]
    logits = np.asarray(jax.jit(model.apply)(params, state, prompt[:1])[0][0, -1], np.float64)
    order = np.argsort(-logits)
    assert logits[order[k - 1]] > logits[order[k]]                    # no tie at the cut
    assert set(np.asarray(drawn).tolist()) == set(order[:k].tolist())


def test_init_cache_signature_is_shared():
    """fnn.models.init_cache/decode_step are fnn.layers': (model, params, state, x, max_len) with
    ``x`` the prompt; a prefill from the cache gives the full forward's logits."""
    import fnn.layers
    assert init_cache is fnn.layers.init_cache and decode_step is fnn.layers.decode_step
    model = GPT(5, 8, 2, 2, 8, 6)
    params, state, _ = model.init(jax.random.PRNGKey(0), (3, 4))
    prompt = tokens((3, 4), 5)
    cache = init_cache(model, params, state, prompt, 6)
    assert cache["blocks"]["attn"]["mha"]["k"].shape == (2, 3, 6, 2, 4)
    assert int(cache["pos"]["index"]) == 0
    logits, cache = jax.jit(lambda p, c, x: decode_step(model, p, c, x, 6))(params, cache, prompt)
    np.testing.assert_allclose(logits, jax.jit(model.apply)(params, state, prompt)[0], atol=1e-12)
    with pytest.raises(ValueError, match=r"init_cache: expected an input x of shape \(batch, "
                                         r"time, ...\) \(the prompt\), got the int 3"):
        init_cache(model, params, state, 3, 6)


def test_gpt_errors():
    with pytest.raises(ValueError, match="positions must be 'learned', 'sinusoidal' or 'rope'"):
        GPT(5, positions="alibi")
    with pytest.raises(TypeError, match=r"activation '<lambda>' has no \.vjp\(z, dy\)"):
        GPT(5, activation=lambda z: z)
    model = GPT(5, 8, 2, 1, 8, 6)
    with pytest.raises(ValueError, match=r"expected token ids of shape \(batch, time\)"):
        model.init(jax.random.PRNGKey(0), (2, 3, 4))
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, 3))
    with pytest.raises(ValueError, match="expected integer token ids"):
        model.apply(params, state, jnp.ones((1, 3)))
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['masks'\]"):
        model.apply(params, state, jnp.ones((1, 3), jnp.int32), masks=None)
    prompt = jnp.array([[1, 2]])
    with pytest.raises(ValueError, match="exceed the model's learned max_len 6"):
        sample(model, params, state, jax.random.PRNGKey(0), prompt, 5)
    with pytest.raises(ValueError, match="prompt \\+ steps <= max_len"):
        sample(model, params, state, jax.random.PRNGKey(0), prompt, 3, max_len=4)
    with pytest.raises(ValueError, match="top_k must be in"):
        sample(model, params, state, jax.random.PRNGKey(0), prompt, 2, top_k=9)
    with pytest.raises(TypeError, match="expected a model built by fnn.models.GPT"):
        value_and_grad(params)
    with pytest.raises(ValueError, match="GPT: fwd/backward does not run in decoding mode"):
        model.backward(params, state, prompt, jnp.ones((1, 2, 5)), cache_len=6)


def test_char_transformer_cli_ends_with_a_readable_summary(tmp_path, capsys):
    """``fnn train char-transformer --quick`` (the bundled task end to end: tiny model, 1 epoch,
    the hand-derived step in ``fit``): it learns something (validation below the uniform
    log2(vocab) bits), writes its files, and stdout ends with a readable summary line (no
    per-epoch lists or dicts, no 16-digit floats) and one JSON object of the final numbers; on
    stderr, after the epoch lines, bits/char, the same validation loss in the epoch lines' unit
    (nats/char) and the samples. The units are checked against the epoch line and against the
    validation loss recomputed independently (float64 NumPy cross-entropy of
    ``fnn.train.predict`` on the saved params)."""
    import json
    import math
    import os
    import re

    from fnn import checkpoint, cli, train
    from fnn.tasks import char_transformer as task
    assert cli.main(["train", "char-transformer", "--quick", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    metrics = json.loads(lines[-1])
    assert set(metrics) == {"task", "val_bpc", "train_bpc", "val_loss", "epochs"}
    assert metrics["epochs"] == 1
    assert not re.search(r"[\[\]{}]", lines[-2]) and not re.search(r"\d\.\d{6}", lines[-2])
    assert f"val_bpc {metrics['val_bpc']:.4f}" in lines[-2]
    # units: the epoch line's val_loss (4 significant digits) is the summary's nats/char
    epoch_line = [l for l in err.splitlines() if l.startswith("epoch 1/1")][-1]
    shown = float(re.search(r"val_loss (\S+)", epoch_line).group(1))
    assert shown == pytest.approx(metrics["val_loss"], rel=1e-3)
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2), rel=1e-12)
    # independent recomputation: mean next-character cross-entropy over the validation windows
    train_text, val_text, alphabet = task.load_text()
    index = {c: i for i, c in enumerate(alphabet)}
    vx, vy = task.windows([index[c] for c in val_text[:4_000]], task.SEQ)
    net = task.model(len(alphabet), quick=True)
    _, state, _ = net.init(jax.random.PRNGKey(0), vx.shape)
    params = checkpoint.load(tmp_path / "char_transformer.safetensors")
    logits = np.asarray(train.predict(net, params, state, vx, batch_size=16), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nats = -np.take_along_axis(logp, np.asarray(vy)[..., None], -1).mean()
    assert metrics["val_loss"] == pytest.approx(nats, rel=1e-4)
    assert metrics["val_bpc"] == pytest.approx(nats / math.log(2), rel=1e-4)
    # the readable summary on stderr comes after the epoch lines
    tail = err[err.rindex(epoch_line):]
    assert f"validation {metrics['val_bpc']:.3f} bits/char" in tail
    assert f"val_loss {metrics['val_loss']:.3f} nats/char" in tail
    first = (tmp_path / "char_transformer_sample.txt").read_text()[:task.SEQ]  # 64 chars each
    assert first.startswith(task.PROMPTS[0]) and repr(first) in tail
    assert metrics["val_bpc"] < math.log2(len(alphabet))
    text = (tmp_path / "char_transformer_sample.txt").read_text()    # texts of SEQ, "\n\n"
    starts = [text[i * (task.SEQ + 2):][:len(p)] for i, p in enumerate(task.PROMPTS)]
    assert starts == list(task.PROMPTS) and len(text) == len(task.PROMPTS) * (task.SEQ + 2) - 1
    assert {"char_transformer_curves.png", "char_transformer_attention.png",
            "char_transformer.safetensors"} <= set(os.listdir(tmp_path))
