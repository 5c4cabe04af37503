"""Float32 accuracy of the hand backward where inputs make it ill-conditioned, against the
float64 gradient: within 2× autodiff's float32 error plus 1e-6 (tests/test_precision.py sweeps
every layer's first example; these are the cases that sweep's draws missed).

- ``MultiHeadAttention(2, use_bias=False)`` on ``(2, 5, 8)`` activations offset by +100: logits
  near 1e4, and ``K``, ``Q`` with a common part 100× their spread. ``dQ = scale·dS K`` turned
  the rounding of ``dS`` (whose rows sum to 0) into errors 100× the gradient (hand 0.17
  relative error on ``q.w`` against autodiff's 0.02); plain and chunked forms.
- A saturated LSTM gate: its derivative from the stored ``a = tanh(z/2)`` was exactly 0 in
  float32 where autodiff's ``σ(1 − σ)`` keeps it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers import LSTM, MultiHeadAttention

from helpers import no_autodiff

REAL_VJP = jax.vjp


def to32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def tree_err(a, b):
    """‖a − b‖ / ‖b‖ over the whole tree, in float64."""
    la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    return float(np.sqrt(sum(np.sum((u - v) ** 2) for u, v in zip(la, lb))
                         / sum(np.sum(v ** 2) for v in lb)))


def grads_fn(layer):
    def grads(params, x, dy):
        f = lambda p, x: layer.apply(p, {}, x)[0]
        return REAL_VJP(f, params, x)[1](dy), layer.backward(params, {}, x, dy)
    return jax.jit(grads)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["plain", "chunked"])
def test_attention_offset_by_100_hand_as_accurate_as_autodiff(chunk_size, monkeypatch):
    layer = MultiHeadAttention(2, use_bias=False, chunk_size=chunk_size)
    grads = grads_fn(layer)
    for seed in (0, 6, 13, 24):        # the draws where the hand error was 4-12x autodiff's
        params, _, _ = layer.init(jax.random.PRNGKey(seed), (2, 5, 8))
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.standard_normal((2, 5, 8))) + 100
        dy = jnp.asarray(rng.standard_normal((2, 5, 8)))
        with no_autodiff(monkeypatch):
            ref, hand64 = grads(params, x, dy)
            auto, hand = grads(to32(params), to32(x), to32(dy))
        assert tree_err(hand64, ref) < 1e-9                      # the rewrite is exact
        e_hand, e_auto = tree_err(hand, ref), tree_err(auto, ref)
        assert e_hand <= 2 * e_auto + 1e-6, f"seed {seed}: hand {e_hand:.3g}, auto {e_auto:.3g}"


@pytest.mark.parametrize("z", [-30.0, -22.0, 22.0], ids=["f-30", "f-22", "f+22"])
def test_saturated_lstm_gate_keeps_its_gradient_in_float32(z):
    """Forget gate pre-activation ``z`` (its bias): the float32 hand gradient of that bias
    matches float64 to 1e-3 where autodiff's does, and is never 0 where float64's is not."""
    layer = LSTM(2)
    params, _, _ = layer.init(jax.random.PRNGKey(0), (1, 3, 2))
    params = {**params, "b": params["b"].at[2:4].set(z)}            # gates i, f, g, o
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 3, 2)))
    dy = jnp.asarray(rng.standard_normal((1, 3, 2)))
    grads = grads_fn(layer)
    (ref, _), _ = grads(params, x, dy)
    (auto, _), (hand, _) = grads(to32(params), to32(x), to32(dy))
    want, a, h = (np.asarray(g["b"][2:4], np.float64) for g in (ref, auto, hand))
    assert np.all(want != 0)
    rel = lambda g: float(np.max(np.abs(g - want) / np.abs(want)))
    assert np.all(h != 0), f"hand lost the saturated gate's gradient: {h} (float64 {want})"
    assert rel(h) <= max(2 * rel(a), 1e-3), f"hand {h}, autodiff {a}, float64 {want}"
