"""Float32 accuracy of the hand backward where inputs make it ill-conditioned, against the
float64 gradient: within 2× autodiff's float32 error plus 1e-6 (tests/test_precision.py sweeps
every layer's first example; these are the cases that sweep's draws missed).

- ``MultiHeadAttention(2, use_bias=False)`` on ``(2, 5, 8)`` activations offset by +100: logits
  near 1e4, and ``K``, ``Q`` with a common part 100× their spread. ``dQ = scale·dS K`` turned
  the rounding of ``dS`` (whose rows sum to 0) into errors 100× the gradient (hand 0.17
  relative error on ``q.w`` against autodiff's 0.02); plain and chunked forms.
- A saturated LSTM gate: its derivative from the stored ``a = tanh(z/2)`` was exactly 0 in
  float32 where autodiff's ``σ(1 − σ)`` keeps it.
- Saturated GRU gates, tanh units (SimpleRNN, GRU's ``n``) and LSTM cell state: derivatives from
  stored outputs (autodiff's form) lose them; from pre-activations the hand path keeps them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers import GRU, LSTM, MultiHeadAttention, SimpleRNN

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


@functools.lru_cache(maxsize=None)
def grads_fn(layer):
    """``(jax.vjp of apply, backward)``, jitted; one per layer (equal layers are one key), so the
    cases of one layer share its two compilations (float64, float32)."""
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


def block_grads(layer, key, block, value, steps=3, pin=False):
    """The gradient of ``params[key]``'s gate ``block`` (``H = 2`` entries) with that block set to
    ``value``: float64 autodiff (the reference), float32 autodiff, float32 hand. ``pin``: the
    block's ``wi``, ``wh`` columns zeroed, so that its pre-activation is ``value`` exactly."""
    params, _, _ = layer.init(jax.random.PRNGKey(0), (1, steps, 2))
    params = {**params, key: params[key].at[block].set(value)}
    if pin:
        params = {**params, **{k: params[k].at[:, block].set(0) for k in ("wi", "wh")}}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, steps, 2)))
    dy = jnp.asarray(rng.standard_normal((1, steps, 2)))
    grads = grads_fn(layer)
    (ref, _), _ = grads(params, x, dy)
    (auto, _), (hand, _) = grads(to32(params), to32(x), to32(dy))
    return tuple(np.asarray(g[key][block], np.float64) for g in (ref, auto, hand))


def check_kept(want, auto, hand, tol):
    """Hand within 2× autodiff's error + 1e-6 (relative, over the block, as the sweep
    measures), and every entry within ``tol`` (relative) of float64's."""
    assert np.all(want != 0)
    err = lambda g: float(np.linalg.norm(g - want) / np.linalg.norm(want))
    assert err(hand) <= 2 * err(auto) + 1e-6, f"hand {hand}, autodiff {auto}, float64 {want}"
    rel = lambda g: float(np.max(np.abs(g - want) / np.abs(want)))
    assert rel(hand) <= tol, f"hand lost the saturated gradient: {hand} (float64 {want})"


@pytest.mark.parametrize("gate", [0, 1], ids=["r", "z"])
@pytest.mark.parametrize("u", [-30.0, -22.0, 22.0, 30.0])
def test_saturated_gru_gate_keeps_its_gradient_in_float32(gate, u):
    """GRU reset/update gate pre-activation ``u`` (pinned): autodiff's ``σ(1 − σ)`` from ``σ``
    (and the hand path's before it kept pre-activations) is 0 in float32 for ``u`` ≥ 17. At +30
    float64's own ``σ(1 − σ)`` is good to 6e-4 only (``1 − σ ≈ 9e-14``, ulp 1e-16): the
    tolerance; pinning keeps ``u`` from drifting higher, where the reference gets worse."""
    want, auto, hand = block_grads(GRU(2), "bi", slice(2 * gate, 2 * gate + 2), u, pin=True)
    check_kept(want, auto, hand, 1e-2 if u == 30 else 1e-4)


@pytest.mark.parametrize("u", [-12.0, -8.0, 8.0, 12.0])
@pytest.mark.parametrize("where", ["SimpleRNN", "GRU-n"])
def test_saturated_tanh_unit_keeps_its_gradient_in_float32(where, u):
    """A tanh unit's bias ``u``: ``1 − tanh²`` from the stored output (autodiff's form too) is
    rounding noise at ``|u|`` = 8 and 0 at 12 in float32; from the pre-activation it is exact.
    (Beyond ``|u|`` ≈ 18 float64's own autodiff reference is 0, so the sweep stops at 12.)"""
    layer, key, block = ((SimpleRNN(2), "b", slice(0, 2)) if where == "SimpleRNN"
                         else (GRU(2), "bi", slice(4, 6)))
    check_kept(*block_grads(layer, key, block, u), 1e-4)


def test_saturated_lstm_cell_state_keeps_its_gradient_in_float32():
    """Gates i, f, g saturated open (+22) over 12 steps: ``c`` grows to ~12, where ``1 − tanh²c``
    from a stored ``tanh c`` is noise in float32; the i and f bias gradients flow through it."""
    want, auto, hand = block_grads(LSTM(2), "b", slice(0, 6), 22.0, steps=12)
    check_kept(want[:4], auto[:4], hand[:4], 1e-4)


def test_sech2_from_u_and_tanh_u_is_relatively_accurate():
    """``sech²u`` as the LSTM's forward step forms it, ``exp(−2|u|)(1 + |tanh u|)²`` (no
    division), and :func:`_sech2`: within 1e-6 relative of float64 ``1/cosh²u`` for every
    float32 ``u`` where the result is a normal float (|u| to 44), and for tiny ``u``;
    ``1 − tanh²u`` (autodiff's form from the output) is not (0 from |u| ≈ 9 on)."""
    from fnn.layers.cells import _sech2, _sech2_of
    u = np.concatenate([np.linspace(-44, 44, 40001), np.geomspace(1e-30, 1, 200)])
    u = u.astype(np.float32)
    want = 1 / np.cosh(u.astype(np.float64)) ** 2
    forms = jax.jit(lambda u: (_sech2_of(u, jnp.tanh(u)), _sech2(u), 1 - jnp.tanh(u) ** 2))(u)
    ok = want > np.finfo(np.float32).tiny * 4
    rel = [np.max(np.abs(np.asarray(f, np.float64)[ok] - want[ok]) / want[ok]) for f in forms]
    assert rel[0] < 1e-6 and rel[1] < 1e-6, rel
    assert rel[2] > 0.5                                  # the form both of them avoid
