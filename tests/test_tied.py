"""Weight tying in composition: ``tied`` stores one parameter used in two places; its hand
backward (the sum of both uses' gradients) against jax.vjp of the whole model; a tied language
model composed from public layers equals fnn.models.GPT(tie=True) with the same params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import initializers as inits
from fnn.activations import gelu_tanh, swish
from fnn.layers import (Dense, Embedding, LayerNorm, PositionalEmbedding, RMSNorm, Tanh,
                        TransformerBlock, serial, stack, tied)
from fnn.models import GPT

from helpers import check_pair, no_autodiff, tree_rel_err


def tokens(shape, vocab=11, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def hand_and_vjp(model, params, state, x, dy, monkeypatch, **kw):
    """(jax.vjp of apply w.r.t. params, backward, bwd of fwd's residuals), one jit."""
    real_vjp = jax.vjp

    def run(params, dy):
        ref = real_vjp(lambda p: model.apply(p, state, x, **kw)[0], params)[1](dy)[0]
        res = model.fwd(params, state, x, **kw)[2]
        return ref, model.backward(params, state, x, dy, **kw), model.bwd(params, state, res, dy, **kw)
    with no_autodiff(monkeypatch):
        return jax.jit(run)(params, dy)


def test_shared_dense_weight_gets_both_gradients(rng, monkeypatch):
    """y = tanh(x W) W: one W, used twice; dW = the sum of both uses' gradients."""
    model = tied(serial(Dense(4, use_bias=False), Tanh(), Dense(4, use_bias=False)), "2/w", "0/w")
    params, state, out = model.init(jax.random.PRNGKey(0), (3, 4))
    assert jax.tree.structure(params) == jax.tree.structure({"0": {"w": 0}, "1": {}})
    w = np.asarray(params["0"]["w"])
    x, dy = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(3, 4)))
    xn, dyn = np.asarray(x), np.asarray(dy)
    h = np.tanh(xn @ w)
    np.testing.assert_allclose(model.apply(params, state, x)[0], h @ w, rtol=1e-13)
    dz = (dyn @ w.T) * (1 - h ** 2)
    (dp, dx) = model.backward(params, state, x, dy)
    np.testing.assert_allclose(dp["0"]["w"], h.T @ dyn + xn.T @ dz, rtol=1e-12)   # both uses
    np.testing.assert_allclose(dx, dz @ w.T, rtol=1e-12)
    check_pair(model, params, state, x, dy, monkeypatch)


def test_tied_head_keeping_its_bias(rng, monkeypatch):
    """BERT's MLM decoder: logits = h Eᵀ + b, E tied to the embedding, b its own."""
    model = tied(serial(("embed", Embedding(9, 4)), ("norm", LayerNorm()), ("head", Dense(9))),
                 ("head", "w"), ("embed", "w"), transpose=True)
    params, state, out = model.init(jax.random.PRNGKey(0), (2, 3))
    assert out == (2, 3, 9) and set(params["head"]) == {"b"}
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    x, dy = tokens((2, 3), 9), jnp.asarray(rng.normal(size=out))
    ref, (dp, dx), (dp2, dx2) = hand_and_vjp(model, params, state, x, dy, monkeypatch)
    assert dx is None and dx2 is None
    assert tree_rel_err(dp, ref) < 1e-12 and tree_rel_err(dp2, ref) < 1e-12


def composed_lm(vocab, d, heads, depth, hidden, max_len, *, positions, norm_type, eps=None,
                **opts):
    """A decoder-only LM from public layers, its head tied to the embedding."""
    block = TransformerBlock(heads, hidden, 0.0, "pre", True, norm_type=norm_type, eps=eps,
                             rope=positions == "rope", **opts)
    pos = [("pos", PositionalEmbedding(max_len))] if positions == "learned" else []
    norm = LayerNorm if norm_type == "layer" else RMSNorm
    body = serial(("embed", Embedding(vocab, d, w_init=inits.normal(0.02))), *pos,
                  ("blocks", stack(block, depth)), ("norm", norm() if eps is None else norm(eps)),
                  ("head", Dense(vocab, use_bias=False)))
    return tied(body, "head/w", "embed/w", transpose=True)


CONFIGS = {
    "gpt2": dict(positions="learned", norm_type="layer", activation=gelu_tanh),
    "llama": dict(positions="rope", norm_type="rms", eps=1e-5, activation=swish, mlp="gated",
                  num_kv_heads=1, rope_base=500.0, head_dim=4, use_bias=False),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_composed_tied_lm_equals_gpt(config, rng, monkeypatch):
    opts = CONFIGS[config]
    model = composed_lm(11, 8, 2, 2, 16, 8, **opts)
    gpt = GPT(11, 8, 2, 2, 16, 8, tie=True, **opts)
    params, state, out = model.init(jax.random.PRNGKey(0), (2, 6))
    g_params, g_state, g_out = gpt.init(jax.random.PRNGKey(0), (2, 6))
    assert out == g_out == (2, 6, 11)
    assert jax.tree.structure(params) == jax.tree.structure(g_params)       # no "head" stored
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape)), params)
    x, dy = tokens((2, 6)), jnp.asarray(rng.normal(size=out))
    y, y_gpt = jax.jit(lambda p: (model.apply(p, state, x)[0], gpt.apply(p, g_state, x)[0]))(
        params)                                           # one compilation, not one per op
    np.testing.assert_allclose(y, y_gpt, rtol=1e-12, atol=1e-12)
    ref, (dp, dx), (dp2, _) = hand_and_vjp(model, params, state, x, dy, monkeypatch)
    assert dx is None
    assert tree_rel_err(dp, ref) < 1e-9 and tree_rel_err(dp2, ref) < 1e-9
    assert tree_rel_err(jax.jit(gpt.backward)(params, g_state, x, dy)[0], dp) < 1e-12


def test_tied_errors():
    body = serial(("embed", Embedding(5, 3)), ("head", Dense(5, use_bias=False)))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"no parameter head/kernel \(at head the keys are \['w'\]\)"):
        tied(body, "head/kernel", "embed/w").init(key, (2, 4))
    with pytest.raises(ValueError, match=r"head/w has shape \(3, 5\) but embed/w has \(5, 3\)"):
        tied(body, "head/w", "embed/w").init(key, (2, 4))
    with pytest.raises(ValueError, match="overlap"):
        tied(body, "embed", "embed/w")
    with pytest.raises(ValueError, match="must be a path of param keys"):
        tied(body, "", "embed/w")
