"""Recurrent cells and layers: forward against float64 NumPy loops written from PyTorch's
equations (with the weights in PyTorch's own layout, ported as the docstrings say), hand BPTT
against jax.vjp with autodiff disabled, variable lengths against each sequence run alone, errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import backprop, losses
from fnn.combinators import serial, stack
from fnn.core import Layer
from fnn.layers import (GRU, LSTM, Bidirectional, Dense, SimpleRNN, gru_cell, lstm_cell,
                        rnn_cell, scan_rnn, scan_rnn_backward)
from fnn.optim import clip_by_global_norm

from helpers import no_autodiff, rel_err, tree_rel_err, vjp_and_hand

CELLS = {"rnn": (SimpleRNN, rnn_cell, 1, 1), "lstm": (LSTM, lstm_cell, 4, 2),
         "gru": (GRU, gru_cell, 3, 1)}
B, T, F, H = 3, 5, 2, 4
LENGTHS = np.array([5, 2, 0])


def assert_trees_close(a, b, tol=1e-9):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape
        assert rel_err(x, y) < tol, rel_err(x, y)


# --------------------------------------------------------------------------- NumPy reference

def torch_weights(kind, rng, n_in=F, hidden=H):
    """Random weights in PyTorch's layout: weight_ih (G·H, in), weight_hh (G·H, H), two biases."""
    g = CELLS[kind][2] * hidden
    return {"weight_ih": rng.normal(size=(g, n_in)) * 0.6,
            "weight_hh": rng.normal(size=(g, hidden)) * 0.6,
            "bias_ih": rng.normal(size=g) * 0.3, "bias_hh": rng.normal(size=g) * 0.3}


def port(kind, w):
    """PyTorch weights → fnn params, exactly as the docstrings say."""
    p = {"wi": jnp.asarray(w["weight_ih"].T), "wh": jnp.asarray(w["weight_hh"].T)}
    if kind == "gru":
        p.update(bi=jnp.asarray(w["bias_ih"]), bh=jnp.asarray(w["bias_hh"]))
    else:
        p["b"] = jnp.asarray(w["bias_ih"] + w["bias_hh"])
    return p


def sig(z):
    return 1 / (1 + np.exp(-z))


def np_step(kind, w, h, c, x):
    """One step of torch.nn.RNN/LSTM/GRU, from PyTorch's documented equations."""
    gi = w["weight_ih"] @ x + w["bias_ih"]
    gh = w["weight_hh"] @ h + w["bias_hh"]
    if kind == "rnn":
        return np.tanh(gi + gh), c
    if kind == "lstm":
        i, f, g, o = np.split(gi + gh, 4)
        c = sig(f) * c + sig(i) * np.tanh(g)
        return sig(o) * np.tanh(c), c
    r = sig(gi[:H] + gh[:H])
    z = sig(gi[H:2 * H] + gh[H:2 * H])
    n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
    return (1 - z) * n + z * h, c


def np_run(kind, w, x, h0, c0, lengths=None, reverse=False):
    """Each sequence on its own, step by step: outputs (zeros past the end) and final carry."""
    ys = np.zeros(x.shape[:2] + (H,))
    hT, cT = h0.copy(), c0.copy()
    for b in range(x.shape[0]):
        n = x.shape[1] if lengths is None else lengths[b]
        h, c = h0[b], c0[b]
        for t in (reversed(range(n)) if reverse else range(n)):
            h, c = np_step(kind, w, h, c, x[b, t])
            ys[b, t] = h
        hT[b], cT[b] = h, c
    return ys, hT, cT


def init(layer, shape, seed=0):
    """``layer.init`` shapes (no compilation) filled with float64 normals: keeps tests fast.
    States (carries) start at zero, as ``init`` makes them."""
    out = []
    params, state = jax.eval_shape(lambda k: (lambda p, s, o: out.append(o) or (p, s))(
        *layer.init(k, shape)), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape)), params)
    return params, jax.tree.map(lambda a: jnp.zeros(a.shape), state), out[0]


def carry_of(kind, h, c):
    return (jnp.asarray(h), jnp.asarray(c)) if kind == "lstm" else jnp.asarray(h)


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
    assert_trees_close(got, want)


# --------------------------------------------------------------------------- backward

@pytest.mark.parametrize("kind,reverse", [("rnn", True), ("lstm", False), ("lstm", True),
                                          ("gru", True)])
def test_scan_backward_matches_vjp(kind, reverse, rng, monkeypatch):
    """Outputs, final carry and initial carry all differentiated, with padding."""
    cell = CELLS[kind][1]
    p = port(kind, torch_weights(kind, rng))
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    c0 = carry_of(kind, rng.normal(size=(B, H)), rng.normal(size=(B, H)))
    lengths = jnp.asarray(LENGTHS)
    run = lambda p, x, c0: scan_rnn(cell, p, x, c0, lengths=lengths, reverse=reverse)
    ys, cT = jax.eval_shape(run, p, x, c0)
    dys = jnp.asarray(rng.normal(size=ys.shape))                 # also at padded steps: ignored
    dcT = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), cT)
    want, got = vjp_and_hand(run, (p, x, c0), (dys, dcT), lambda p, x, c0, d: scan_rnn_backward(
        cell, p, x, d[0], d[1], c0, lengths=lengths, reverse=reverse), monkeypatch)
    assert_trees_close(got, want)
    assert np.all(np.asarray(got[1])[2, 2:] == 0) and np.all(np.asarray(got[1])[1, 2:] == 0)


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
        assert_trees_close((cf, cb), (cf_ref, cb_ref), 1e-14)


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


@pytest.mark.parametrize("ctor", [SimpleRNN, LSTM, GRU])
def test_share_forward_is_deprecated(ctor, rng):
    with pytest.warns(DeprecationWarning, match=rf"{ctor.__name__}: share_forward is gone and "
                                                r"is ignored.*layer\.fwd/layer\.bwd"):
        layer = ctor(H, share_forward=False)
    params, state, _ = init(layer, (B, T, F))
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    np.testing.assert_array_equal(layer.apply(params, state, x)[0],
                                  ctor(H).apply(params, state, x)[0])


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


def test_residuals_pass_through_stack_scan(rng, monkeypatch):
    """Residuals are arrays, so ``stack`` scans them: hand gradients of a stacked LSTM equal
    autodiff's."""
    model = serial(stack(LSTM(F), 2), Dense(1))
    params, state, _ = init(model, (B, T, F), 5)
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    target = jnp.asarray(rng.normal(size=(B, T, 1)))
    want = jax.jit(jax.grad(lambda p: losses.mse(model.apply(p, state, x)[0], target)))(params)
    with no_autodiff(monkeypatch):
        (_, _), got = jax.jit(backprop.value_and_grad(model, losses.mse))(params, state, x,
                                                                          target)
    assert tree_rel_err(got, want) < 1e-9


# --------------------------------------------------------------------------- variable lengths

@pytest.mark.parametrize("kind,reverse", [("lstm", False), ("gru", True)])
def test_padded_batch_equals_each_sequence_alone(kind, reverse, rng):
    layer = CELLS[kind][0](H, return_carry=True, reverse=reverse)
    params, _, _ = init(layer, (2, T, F), 1)

    @jax.jit
    def run(x, dy, dc, lengths=None):
        out, _ = layer.apply(params, {}, x, lengths=lengths)
        return out, layer.backward(params, {}, x, (dy, dc), lengths=lengths)

    lengths = np.array([5, 1])
    x = jnp.asarray(rng.normal(size=(2, T, F)))
    dy = jnp.asarray(rng.normal(size=(2, T, H)))                 # also at padded steps: ignored
    dc = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)),
                      jax.eval_shape(lambda: layer.apply(params, {}, x)[0][1]))
    (y, carry), (grads, dx) = run(x, dy, dc, jnp.asarray(lengths))
    total = jax.tree.map(jnp.zeros_like, params)
    for b, n in enumerate(lengths):
        (yb, cb), (gb, dxb) = run(x[b:b + 1, :n], dy[b:b + 1, :n],
                                  jax.tree.map(lambda a: a[b:b + 1], dc))
        np.testing.assert_allclose(y[b, :n], yb[0], rtol=1e-12, atol=1e-14)
        assert np.all(np.asarray(y[b, n:]) == 0)                  # padded outputs are zeros
        for a, c in zip(jax.tree.leaves(carry), jax.tree.leaves(cb)):
            np.testing.assert_allclose(a[b], c[0], rtol=1e-12, atol=1e-14)
        total = jax.tree.map(jnp.add, total, gb)
        np.testing.assert_allclose(dx[b, :n], dxb[0], rtol=1e-10, atol=1e-14)
        assert np.all(np.asarray(dx[b, n:]) == 0)                 # padding gets no gradient
    assert_trees_close(grads, total, 1e-10)


def test_reverse_starts_at_each_sequence_end(rng):
    """The reversed scan's output at step n-1 is one cell step from the initial carry."""
    p = port("gru", torch_weights("gru", rng))
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    lengths = np.array([5, 3, 1])
    ys, _ = scan_rnn(gru_cell, p, x, lengths=jnp.asarray(lengths), reverse=True)
    for b, n in enumerate(lengths):
        _, h = gru_cell(p, jnp.zeros((1, H)), x[b:b + 1, n - 1])
        np.testing.assert_allclose(ys[b, n - 1], h[0], rtol=1e-12)


# --------------------------------------------------------------------------- state and stacks

def test_stateful_carry_continues_across_calls(rng):
    layer = LSTM(H, stateful=True)
    params, state, _ = init(layer, (B, T, F), 2)
    x = jnp.asarray(rng.normal(size=(B, 2 * T, F)))
    whole, _ = LSTM(H).apply(params, {}, x)
    y1, state = layer.apply(params, state, x[:, :T])
    y2, state = layer.apply(params, state, x[:, T:])
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), whole, rtol=1e-12)
    np.testing.assert_allclose(state["carry"][0], whole[:, -1], rtol=1e-12)


def test_stack_in_serial_takes_lengths_and_hand_gradients_match(rng, monkeypatch):
    model = serial(SimpleRNN(H), SimpleRNN(3, return_sequences=False), Dense(2))
    params, state, _ = init(model, (B, T, F), 3)
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    target = jnp.asarray(rng.normal(size=(B, 2)))
    lengths = jnp.asarray(LENGTHS)
    loss = lambda p: losses.mse(model.apply(p, state, x, lengths=lengths)[0], target)
    want = jax.jit(jax.grad(loss))(params)
    hand = backprop.value_and_grad(model, losses.mse)
    with no_autodiff(monkeypatch):                       # traced (so checked) inside the patch
        (_, _), got = jax.jit(lambda p: hand(p, state, x, target, lengths=lengths))(params)
    assert_trees_close(got, want)
    # gradient clipping treats these grads as any tree
    clipped, _ = clip_by_global_norm(0.01).update(got, clip_by_global_norm(0.01).init(got))
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(clipped)))
    assert norm == pytest.approx(0.01, rel=1e-9)


def test_hand_training_step_runs_one_forward_scan():
    """The hand path runs ``fwd`` once and ``bwd`` from its residuals: one forward loop and
    one reverse error loop in a jitted hand-gradient step."""
    model = serial(LSTM(8, return_sequences=False), Dense(1))
    params, state, _ = init(model, (2, 6, 3))
    vg = jax.jit(backprop.value_and_grad(model, losses.mse))
    hlo = vg.lower(params, state, jnp.ones((2, 6, 3)), jnp.ones((2, 1))).compile().as_text()
    assert hlo.count(" while(") == 2, "expected one forward and one reverse scan"


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


def test_char_lstm_windows_continue_each_stream():
    """Truncated BPTT data: unshuffled minibatches of ``batch`` rows continue every stream."""
    from fnn.tasks.char_lstm import windows
    ids = np.arange(50, dtype=np.int32)
    x, y = windows(ids, batch=2, window=4)                      # 2 streams of 24 steps
    assert x.shape == (12, 4)
    np.testing.assert_array_equal(y, x + 1)                     # targets: the next character
    streams = x.reshape(6, 2, 4).transpose(1, 0, 2).reshape(2, -1)
    np.testing.assert_array_equal(streams, np.arange(48).reshape(2, 24))
    with pytest.raises(ValueError, match="char-lstm: text of 5 characters is too short"):
        windows(ids[:5], batch=2, window=4)
