"""Recurrent cells: one step and its hand-derived backward against float64 NumPy (PyTorch's
equations) and jax.vjp with autodiff disabled; the hand path's fast forward (LSTM: one tanh for
all four gates) in float32; the cells' initialization."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers import GRU, LSTM

from helpers import assert_trees_close, no_autodiff, tree_rel_err
from rnn_reference import CELLS, F, H, carry_of, np_step, port, torch_weights

# --------------------------------------------------------------------------- one step

@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_op_and_its_backward(kind, rng, monkeypatch):
    cell = CELLS[kind][1]
    w = torch_weights(kind, rng)
    p = port(kind, w)
    x, h, c = rng.normal(size=(2, F)), rng.normal(size=(2, H)), rng.normal(size=(2, H))
    carry, out = cell(p, carry_of(kind, h, c), jnp.asarray(x))
    ref = [np_step(kind, w, h[b], c[b], x[b]) for b in range(2)]
    np.testing.assert_allclose(out, np.stack([r[0] for r in ref]), rtol=1e-12)
    if kind == "lstm":
        np.testing.assert_allclose(carry[1], np.stack([r[1] for r in ref]), rtol=1e-12)
    dcarry = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), carry)
    dh = jnp.asarray(rng.normal(size=(2, H)))
    _, vjp = jax.vjp(lambda p, cr, x: cell(p, cr, x), p, carry_of(kind, h, c), jnp.asarray(x))
    want = vjp((dcarry, dh))
    with no_autodiff(monkeypatch):
        got = cell.backward(p, carry_of(kind, h, c), jnp.asarray(x), dcarry, dh)
    assert_trees_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_backward_without_an_output_gradient(kind, rng, monkeypatch):
    """``dh`` omitted: the output's gradient is zero (the carry's alone flows back)."""
    cell = CELLS[kind][1]
    p = port(kind, torch_weights(kind, rng))
    carry = carry_of(kind, rng.normal(size=(2, H)), rng.normal(size=(2, H)))
    x = jnp.asarray(rng.normal(size=(2, F)))
    dcarry = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), carry)
    _, vjp = jax.vjp(lambda p, cr, x: cell(p, cr, x), p, carry, x)
    want = vjp((dcarry, jnp.zeros((2, H))))
    with no_autodiff(monkeypatch):
        got = cell.backward(p, carry, x, dcarry)
    assert_trees_close(got, want, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- the fast forward

@pytest.mark.parametrize("kind", list(CELLS))
def test_fast_forward_equals_apply_in_float32(kind, rng):
    """The hand path's forward (LSTM: one tanh for all four gates) equals ``apply`` to 1e-6 in
    float32 over 64 steps with the default initialization (float64 to 1e-12 is checked
    above)."""
    layer = CELLS[kind][0](16, return_carry=True)
    params, _, _ = layer.init(jax.random.PRNGKey(1), (4, 64, 8))
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    x = jnp.asarray(rng.normal(size=(4, 64, 8)), jnp.float32)
    y, _ = layer.apply(params, {}, x)
    fy, _, res = layer.fwd(params, {}, x)
    assert jax.tree.leaves(fy)[0].dtype == jnp.float32
    assert tree_rel_err(fy, y) < 1e-6
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(res))


def test_one_tanh_sigmoid_error_bound():
    """``σ(u) = (1 + tanh(u/2))/2`` in float32 is within 2.5e-7 (about 2 ulp of 1) of the exact
    value for every ``u`` — so, elementwise, no further from it than float32 rounding of 1."""
    u = np.linspace(-40, 40, 200001)
    exact = 1 / (1 + np.exp(-u))                                  # float64
    fast = 0.5 + 0.5 * np.tanh(jnp.asarray(0.5 * u, jnp.float32))
    assert np.max(np.abs(np.asarray(fast, np.float64) - exact)) < 2.5e-7


# --------------------------------------------------------------------------- initialization

def test_initialization(key):
    p, _, _ = LSTM(6).init(key, (2, 3, 5))
    np.testing.assert_array_equal(p["b"], np.r_[np.zeros(6), np.ones(6), np.zeros(12)])
    for k in range(4):                                   # each gate's recurrent block orthogonal
        blk = np.asarray(p["wh"][:, 6 * k:6 * (k + 1)])
        np.testing.assert_allclose(blk.T @ blk, np.eye(6), atol=1e-12)
    assert np.max(np.abs(p["wi"])) <= np.sqrt(6 / (5 + 6))   # Glorot uniform per gate
    g, _, shape = GRU(6, return_sequences=False).init(key, (2, 3, 5))
    assert shape == (2, 6) and not np.any(g["bi"]) and not np.any(g["bh"])
