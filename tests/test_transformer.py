"""MLP and TransformerBlock against NumPy written from the equations, their hand-derived backward
and residual pair (``fwd``/``bwd``) against jax.vjp, and ``stack(block, n)`` against n unrolled
copies (outputs and gradients, hand and autodiff, with dropout keys; ``remat`` changes neither)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.activations import relu
from fnn.combinators import serial, stack
from fnn.layers import MLP, TransformerBlock

from helpers import check_pair, no_autodiff, tree_rel_err


def randomize(params, rng):
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(0.0, 0.5, p.shape)), params)


# --------------------------------------------------------------------------- NumPy references

def np_gelu(z):
    return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def np_linear(x, p):
    return x @ np.asarray(p["w"]) + (np.asarray(p["b"]) if "b" in p else 0)


def np_layer_norm(x, p, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["offset"])


def np_causal_mha(x, p, heads):
    b, t, f = x.shape
    q, k, v = (np_linear(x, p[n]).reshape(b, t, heads, -1) for n in "qkv")
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    return np_linear(np.einsum("bhts,bshd->bthd", a, v).reshape(b, t, -1), p["o"])


def np_mlp(x, p):
    return np_linear(np_gelu(np_linear(x, p["fc1"])), p["fc2"])


# --------------------------------------------------------------------------- MLP

def test_mlp_matches_numpy_and_vjp(rng, monkeypatch):
    layer = MLP(6, 3)
    params, _, out = layer.init(jax.random.PRNGKey(0), (2, 4, 5))
    params = randomize(params, rng)
    x, dy = jnp.asarray(rng.normal(size=(2, 4, 5))), jnp.asarray(rng.normal(size=(2, 4, 3)))
    real_vjp = jax.vjp

    def run(params, x, dy):
        y, pull = real_vjp(lambda p, x: layer.apply(p, {}, x)[0], params, x)
        return y, pull(dy), layer.backward(params, {}, x, dy)
    with no_autodiff(monkeypatch):
        y, ref, got = jax.jit(run)(params, x, dy)
    np.testing.assert_allclose(y, np_mlp(np.asarray(x), params), rtol=1e-12, atol=1e-12)
    assert tree_rel_err(got, ref) < 1e-12 and out == (2, 4, 3)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_mlp_residual_pair(activation, rng, monkeypatch):
    layer = MLP(6, 3, activation=relu) if activation == "relu" else MLP(6, use_bias=False)
    params, state, out = layer.init(jax.random.PRNGKey(0), (2, 4, 5))
    params = randomize(params, rng)
    x, dy = jnp.asarray(rng.normal(size=(2, 4, 5))), jnp.asarray(rng.normal(size=out))
    check_pair(layer, params, state, x, dy, monkeypatch)


# --------------------------------------------------------------------------- block

@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_matches_equations(norm, rng):
    block = TransformerBlock(2, 12, norm=norm, causal=True)
    params, state, out = block.init(jax.random.PRNGKey(0), (2, 5, 8))
    params = randomize(params, rng)
    x = rng.normal(size=(2, 5, 8))
    y = jax.jit(lambda p, x: block.apply(p, state, x)[0])(params, jnp.asarray(x))
    if norm == "pre":
        a, m = params["attn"], params["mlp"]
        h = x + np_causal_mha(np_layer_norm(x, a["norm"]), a["mha"], 2)
        ref = h + np_mlp(np_layer_norm(h, m["norm"]), m["mlp"])
    else:
        h = np_layer_norm(x + np_causal_mha(x, params["attn"]["mha"], 2), params["norm1"])
        ref = np_layer_norm(h + np_mlp(h, params["mlp"]["mlp"]), params["norm2"])
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    assert out == (2, 5, 8)


def test_block_backward_matches_vjp(rng, monkeypatch):
    """Biases on, dropout on, RMS norm, rope, grouped kv heads (the sweep covers use_bias=False)."""
    block = TransformerBlock(4, 12, dropout=0.2, causal=True, norm_type="rms", rope=True,
                             num_kv_heads=2)
    params, state, _ = block.init(jax.random.PRNGKey(0), (2, 5, 8))
    params = randomize(params, rng)
    x, dy = (jnp.asarray(rng.normal(size=(2, 5, 8))) for _ in range(2))
    key, real_vjp = jax.random.PRNGKey(3), jax.vjp

    def both(params, x, dy):
        ref = real_vjp(lambda p, x: block.apply(p, state, x, key=key, train=True)[0], params, x)[1]
        return ref(dy), block.backward(params, state, x, dy, key=key, train=True)
    with no_autodiff(monkeypatch):
        ref, got = jax.jit(both)(params, x, dy)
    assert tree_rel_err(got, ref) < 1e-9


@pytest.mark.parametrize("norm,train,chunk", [("pre", True, None), ("post", False, 2),
                                              ("pre", False, 3)])
def test_block_residual_pair(norm, train, chunk, rng, monkeypatch):
    """Biases on; training with dropout (attention and sublayer outputs) or eval; the chunked
    attention form; causal with a mask."""
    block = TransformerBlock(2, 12, dropout=0.2, norm=norm, causal=True, chunk_size=chunk)
    params, state, _ = block.init(jax.random.PRNGKey(0), (2, 5, 8))
    params = randomize(params, rng)
    x, dy = (jnp.asarray(rng.normal(size=(2, 5, 8))) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 1, 5, 5)) > 0.3)
    check_pair(block, params, state, x, dy, monkeypatch, mask=mask, train=train,
               key=jax.random.PRNGKey(3) if train else None)


# --------------------------------------------------------------------------- stack

def unstack(tree, n):
    return {str(i): jax.tree.map(lambda a: a[i], tree) for i in range(n)}


@pytest.mark.parametrize("remat", [False, True])
def test_stack_equals_unrolled_copies(remat, rng, monkeypatch):
    """stack(block, 2) against serial(block, block) with the same params and keys, in training
    mode with dropout: outputs, and stack's hand-derived backward (``bwd`` of the residuals its
    ``fwd`` stacked; with ``remat`` each copy's input, its forward rerun) against autodiff of the
    unrolled copies (autodiff through the stack is checked by test_remat_changes_nothing)."""
    block = TransformerBlock(2, 6, dropout=0.1, causal=True)
    deep, unrolled = stack(block, 2, remat=remat), serial(block, block)
    params, state, out = deep.init(jax.random.PRNGKey(0), (2, 3, 4))
    assert jax.tree.leaves(params)[0].shape[0] == 2 and out == (2, 3, 4)
    params_u, state_u = unstack(params, 2), unstack(state, 2)
    x, dy = (jnp.asarray(rng.normal(size=(2, 3, 4))) for _ in range(2))
    key, real_vjp, bad = jax.random.PRNGKey(1), jax.vjp, []
    kw = dict(key=key, train=True)

    def run_stack(params, state):
        y, _, res = deep.fwd(params, state, x, **kw)
        # residual leaves as fwd returns them (at trace time a Python number or NumPy array
        # still shows), each stacked along the copy axis
        bad.extend(f"{type(a).__name__} {getattr(a, 'shape', '')}" for a in jax.tree.leaves(res)
                   if not (isinstance(a, jax.Array) and a.shape[0] == 2))
        return y, deep.bwd(params, state, res, dy, **kw)

    def run_unrolled(params, state):
        f = lambda p, x: unrolled.apply(p, state, x, **kw)[0]
        y, pull = real_vjp(f, params, x)
        return y, pull(dy)
    with no_autodiff(monkeypatch):
        (ys, (dps, dxs)), (yu, auto_u) = jax.jit(
            lambda p, s, pu, su: (run_stack(p, s), run_unrolled(pu, su)))(
            params, state, params_u, state_u)
    np.testing.assert_allclose(ys, yu, rtol=1e-12, atol=1e-12)
    assert tree_rel_err((unstack(dps, 2), dxs), auto_u) < 1e-10      # stack's hand rules
    assert not bad, f"residuals not stacked arrays: {bad}"


def test_remat_changes_nothing(rng):
    block = TransformerBlock(2, 8, causal=True)
    plain, remat = stack(block, 2), stack(block, 2, remat=True)
    params, state, _ = plain.init(jax.random.PRNGKey(0), (2, 4, 8))
    x = jnp.asarray(rng.normal(size=(2, 4, 8)))

    def run(model):
        loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, state, x)[0]))
        return loss(params, x), jax.grad(loss, (0, 1))(params, x)

    def unrolled_grad():     # the same two blocks by hand, as a reference for grad-through-scan
        at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
        one = lambda p, h: block.apply(at(p, 0), at(state, 0), h)[0]
        two = lambda p, h: block.apply(at(p, 1), at(state, 1), h)[0]
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(two(p, one(p, x)))), (0, 1))(params, x)
    a, b, c = jax.jit(lambda: (run(plain), run(remat), unrolled_grad()))()
    assert tree_rel_err(b, a) < 1e-12               # (the hand backward ignores remat)
    assert tree_rel_err(a[1], c) < 1e-12


def test_block_errors():
    with pytest.raises(ValueError, match="norm must be 'pre' or 'post'"):
        TransformerBlock(2, 8, norm="middle")
    with pytest.raises(ValueError, match="norm_type must be 'layer' or 'rms'"):
        TransformerBlock(2, 8, norm_type="batch")
    with pytest.raises(ValueError, match=r"expected input shape \(batch, time, features\)"):
        TransformerBlock(2, 8).init(jax.random.PRNGKey(0), (2, 8))
    with pytest.raises(TypeError, match=r"MLP: activation 'tanh' has no \.vjp\(z, dy\)"):
        MLP(4, activation=jnp.tanh)
    with pytest.raises(TypeError, match=r"TransformerBlock: activation '<lambda>' has no \.vjp"):
        TransformerBlock(2, 8, activation=lambda z: z)
    with pytest.raises(ValueError, match="mlp must be 'dense', 'gated' or a Layer"):
        TransformerBlock(2, 8, mlp="swiglu")
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, ..., 5\)"):
        layer = MLP(4, activation=relu)
        params, _, _ = layer.init(jax.random.PRNGKey(0), (2, 5))
        layer.apply(params, {}, jnp.ones((2, 6)))
