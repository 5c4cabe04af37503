"""The small GPT: hand-derived backward and training step against autodiff, KV-cache decoding
against the full causal forward (learned, sinusoidal, rotary positions), sampling against the
full forward, error messages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import losses
from fnn.core import cast
from fnn.models import GPT, decode_step, init_cache, sample, value_and_grad


@pytest.fixture(autouse=True)
def fast_threefry():
    """XLA:CPU compiles partitionable threefry draws ~10x slower (see tests/test_attention.py)."""
    with jax.threefry_partitionable(False):
        yield


def tree_rel_err(a, b):
    scale = max(np.max(np.abs(np.asarray(x))) for x in jax.tree.leaves(b))
    return max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale


def tokens(shape, vocab=11, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


@pytest.mark.parametrize("tie,unroll,depth", [(True, False, 2), (False, True, 1)])
def test_hand_gradients_match_autodiff(tie, unroll, depth, monkeypatch):
    """GPT.backward and value_and_grad (hand rules, autodiff patched to raise) against
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
        return auto, value_and_grad(model, unroll=unroll)(params, state, x, y, **kw), \
            model.backward(params, state, x, loss.grad(logits, y), **kw)
    with monkeypatch.context() as m:
        for name in ("vjp", "grad", "value_and_grad", "jvp", "linearize", "linear_transpose"):
            m.setattr(jax, name, None)
        (l_auto, g_auto), ((l_hand, _), g_hand), (g_back, dx) = jax.jit(run)(params)
    assert dx is None
    assert abs(float(l_hand - l_auto)) < 1e-12
    assert tree_rel_err(g_hand, g_auto) < 1e-9 and tree_rel_err(g_back, g_auto) < 1e-9


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


def test_gpt_errors():
    with pytest.raises(ValueError, match="positions must be 'learned', 'sinusoidal' or 'rope'"):
        GPT(5, positions="alibi")
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


def test_char_transformer_task_quick_run(tmp_path):
    """The bundled task end to end (tiny model, 1 epoch, the unrolled hand-derived step in
    ``fit``): it learns something (validation below the uniform log2(vocab) bits) and writes its
    files."""
    import math
    import os

    from fnn.tasks import char_transformer
    m = char_transformer.run(quick=True, quiet=True, out=str(tmp_path))
    vocab = len(char_transformer.load_text()[2])
    assert np.isfinite(m["val_bpc"]) and m["val_bpc"] < math.log2(vocab)
    assert len(m["samples"]) == len(char_transformer.PROMPTS)
    assert {"char_transformer_curves.png", "char_transformer_attention.png",
            "char_transformer_sample.txt", "char_transformer.safetensors"} <= set(os.listdir(tmp_path))
