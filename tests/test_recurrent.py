"""Recurrent layers and ``Bidirectional``: forward against float64 NumPy loops written from
PyTorch's equations (with the weights in PyTorch's own layout, ported as the docstrings say), the
residual pair (``fwd``/``bwd``) against ``apply``/``backward``/jax.vjp with autodiff disabled,
``meta``, errors. Cells are in test_recurrent_cells.py, scans and BPTT in test_recurrent_scan.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.core import Layer
from fnn.layers import GRU, LSTM, Bidirectional, Dense, SimpleRNN, lstm_cell, scan_rnn

from helpers import assert_trees_close, no_autodiff, tree_rel_err
from rnn_reference import (CELLS, LENGTHS, B, F, H, T, carry_of, init, np_run,
                           port, torch_weights)

# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("masked_reverse", [False, True], ids=["plain", "lengths-reverse"])
def test_layer_forward_matches_numpy(kind, masked_reverse, rng):
    w = torch_weights(kind, rng)
    x = rng.normal(size=(B, T, F))
    h0, c0 = rng.normal(size=(B, H)), rng.normal(size=(B, H))
    lengths = LENGTHS if masked_reverse else None
    ys, hT, cT = np_run(kind, w, x, h0, c0, lengths, masked_reverse)
    ctor = CELLS[kind][0]
    kw = {"initial_carry": carry_of(kind, h0, c0)}
    if masked_reverse:
        kw["lengths"] = jnp.asarray(LENGTHS)
    layer = ctor(H, return_carry=True, reverse=masked_reverse)
    (y, carry), _ = layer.apply(port(kind, w), {}, jnp.asarray(x), **kw)
    np.testing.assert_allclose(y, ys, rtol=1e-12, atol=1e-12)
    want = (hT, cT) if kind == "lstm" else hT
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # the "last" output is each sequence's final h (step 0 when reversed; h0 when empty)
    last, _ = ctor(H, return_sequences=False, reverse=masked_reverse).apply(
        port(kind, w), {}, jnp.asarray(x), **kw)
    np.testing.assert_allclose(last, hT, rtol=1e-12, atol=1e-12)


def test_bidirectional_forward(rng):
    """Forward: the two directions' own scans, merged; backward is in the shared sweep."""
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    lengths = jnp.asarray(LENGTHS)
    for merge in ("concat", "sum"):
        layer = Bidirectional(LSTM(H, return_carry=True), merge)
        params, state, shape = init(layer, (B, T, F))
        (y, (cf, cb)), _ = layer.apply(params, state, x, lengths=lengths)
        assert y.shape == shape[0]
        yf, cf_ref = scan_rnn(lstm_cell, params["forward"], x, lengths=lengths)
        yb, cb_ref = scan_rnn(lstm_cell, params["backward"], x, lengths=lengths, reverse=True)
        np.testing.assert_allclose(y, jnp.concatenate([yf, yb], -1) if merge == "concat"
                                   else yf + yb, rtol=1e-14)
        assert_trees_close((cf, cb), (cf_ref, cb_ref), rtol=1e-14, atol=1e-15)


# --------------------------------------------------------------------------- residuals

def _pair(n):
    return lambda rng: tuple(jnp.asarray(rng.normal(size=(B, H))) for _ in range(n))


# (name, layer, call keywords from rng): the variants the examples use
RESIDUAL_CASES = [
    ("rnn-last-reverse-stateful-lengths", SimpleRNN(H, return_sequences=False, reverse=True,
                                                    stateful=True), {"lengths": LENGTHS}),
    ("lstm-carry-initial", LSTM(H, return_carry=True), {"initial_carry": _pair(2)}),
    ("lstm-reverse-lengths-last", LSTM(H, reverse=True, return_sequences=False),
     {"lengths": LENGTHS}),
    ("lstm-stateful", LSTM(H, stateful=True), {}),
    ("gru-carry-lengths", GRU(H, return_carry=True), {"lengths": LENGTHS}),
    ("gru-reverse-initial", GRU(H, reverse=True), {"initial_carry": lambda rng: _pair(1)(rng)[0]}),
    ("bi-lstm-carry-lengths-initial", Bidirectional(LSTM(H, return_carry=True)),
     {"lengths": LENGTHS, "initial_carry": lambda rng: (_pair(2)(rng), _pair(2)(rng))}),
    ("bi-gru-last-sum", Bidirectional(GRU(H, return_sequences=False, stateful=True), "sum"), {}),
]


def _case(layer, kw, rng, dtype=jnp.float64):
    params, state, _ = init(layer, (B, T, F), 4)
    # stateful carries start from a random (not zero) carry, to be read like initial_carry
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), state)
    kw = {k: (jnp.asarray(v) if k == "lengths" else v(rng)) for k, v in kw.items()}
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    return jax.tree.map(lambda a: a.astype(dtype) if a.dtype.kind == "f" else a,
                        (params, state, x, kw))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,layer,kw", RESIDUAL_CASES, ids=[c[0] for c in RESIDUAL_CASES])
def test_fwd_bwd_equal_apply_backward_and_vjp(name, layer, kw, train, rng, monkeypatch):
    """``fwd`` gives ``apply``'s output and new state (float64, 1e-12) and residuals that are
    arrays only; ``bwd`` of them equals ``backward`` and ``jax.vjp`` of ``apply`` (1e-9)."""
    params, state, x, kw = _case(layer, kw, rng)
    not_arrays, real_vjp = [], jax.vjp

    def fwd(p, s, x, kw):
        out = layer.fwd(p, s, x, train=train, **kw)
        not_arrays.extend(type(a).__name__ for a in jax.tree.leaves(out[2])   # as fwd returns
                          if not isinstance(a, jax.Array))                    # them (trace time)
        return out
    fy, fstate, res = jax.jit(fwd)(params, state, x, kw)         # residuals cross a jit boundary
    assert not not_arrays, f"{name}: residuals include {not_arrays}"
    assert jax.tree.structure(res) == jax.tree.structure(jax.tree.map(jnp.asarray, res))
    y = jax.eval_shape(lambda: layer.apply(params, state, x, train=train, **kw)[0])
    dy = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), y)

    def rest(params, x, res, dy, kw):                # apply, its jax.vjp, bwd, backward: one jit
        f = lambda p, x: layer.apply(p, state, x, train=train, **kw)[0]
        return layer.apply(params, state, x, train=train, **kw), real_vjp(f, params, x)[1](dy), \
            layer.bwd(params, state, res, dy, train=train, **kw), \
            layer.backward(params, state, x, dy, train=train, **kw)
    with no_autodiff(monkeypatch):
        (y, new_state), want, got, via_backward = jax.jit(rest)(params, x, res, dy, kw)
    assert tree_rel_err((fy, fstate), (y, new_state)) < 1e-12
    assert tree_rel_err(got, want) < 1e-9
    assert tree_rel_err(via_backward, want) < 1e-9


# --------------------------------------------------------------------------- constructors, meta

@pytest.mark.parametrize("ctor", [SimpleRNN, LSTM, GRU])
def test_share_forward_is_gone(ctor):
    """``share_forward`` (deprecated and ignored since the residual pair replaced it) is removed:
    passing it is an error, not a warning."""
    with pytest.raises(TypeError, match="share_forward"):
        ctor(H, share_forward=False)


def test_bidirectional_finds_its_twin_in_meta():
    layer = LSTM(H, return_carry=True)
    assert layer.meta["return_carry"] is True and layer.meta["reverse"] is False
    assert layer.meta["twin"]().name == "LSTM(4, reverse)"
    with pytest.raises(TypeError):
        layer.meta["twin"] = None                                # read-only
    with pytest.raises(TypeError, match=r"Bidirectional: expected a SimpleRNN, LSTM or GRU "
                                        r"layer \(one whose meta names its 'twin'\), got LSTM"):
        Bidirectional(layer._replace(meta={}))                   # apply attributes are not read
    custom = Layer(layer.init, layer.apply, layer.fwd, layer.bwd, "mine",
                   meta={"twin": lambda: GRU(H, reverse=True)})
    assert Bidirectional(custom).children[1][1].name == "GRU(4, reverse)"


# --------------------------------------------------------------------------- errors

def test_errors(key):
    layer = LSTM(H)
    params, state, _ = init(layer, (B, T, F))
    x = jnp.ones((B, T, F))
    with pytest.raises(ValueError, match=r"LSTM: expected a batch of sequences of shape "
                                         r"\(batch, time, 2\), got shape \(3, 2\)"):
        layer.apply(params, state, jnp.ones((B, F)))
    with pytest.raises(ValueError, match=r"LSTM: expected input shape \(batch, time, features\)"):
        layer.init(key, (B, F))
    with pytest.raises(ValueError, match=r"LSTM: lengths must be an integer array of shape "
                                         r"\(batch,\) = \(3,\), got int\d+ of shape \(2,\)"):
        layer.apply(params, state, x, lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"LSTM: lengths must lie in \[0, 5\] \(the time axis\), "
                                         r"got values from 1 to 7"):
        layer.backward(params, state, x, x[..., :1].repeat(H, -1), lengths=jnp.array([1, 7, 2]))
    with pytest.raises(ValueError, match=r"LSTM: the output gradient dy must have the output's "
                                         r"shape \(3, 5, 4\), got \(3, 4\)"):
        layer.backward(params, state, x, jnp.ones((B, H)))
    with pytest.raises(ValueError, match=r"LSTM: initial_carry must be \(h, c\), each of shape "
                                         r"\(batch, hidden\) = \(3, 4\), got shapes"):
        layer.apply(params, state, x, initial_carry=(jnp.ones((B, 5)), jnp.ones((B, 5))))
    with pytest.raises(ValueError, match=r"GRU: initial_carry must be h of shape \(batch, hidden\)"):
        gp, _, _ = init(GRU(H), (B, T, F))
        GRU(H).apply(gp, {}, x, initial_carry=(jnp.ones((B, H)), jnp.ones((B, H))))
    stateful = LSTM(H, stateful=True)
    sp, ss, _ = init(stateful, (B, T, F))
    with pytest.raises(ValueError, match=r"LSTM: the stateful carry must be \(h, c\), each of "
                                         r"shape \(batch, hidden\) = \(2, 4\)"):
        stateful.apply(sp, ss, x[:2])
    with pytest.raises(ValueError, match=r"scan_rnn\(lstm\): expected a batch of sequences"):
        scan_rnn(lstm_cell, params, jnp.ones((T, F)))
    with pytest.raises(ValueError, match=r"LSTM: hidden must be a positive int, got 0"):
        LSTM(0)
    with pytest.raises(TypeError, match=r"Bidirectional: expected a SimpleRNN, LSTM or GRU layer"):
        Bidirectional(Dense(3))
    with pytest.raises(ValueError, match=r"Bidirectional: merge must be 'concat' or 'sum'"):
        Bidirectional(LSTM(3), "mean")
    with pytest.raises(TypeError, match=r"rnn_cell: activation must be an fnn activation"):
        SimpleRNN(3, activation=np.tanh)
