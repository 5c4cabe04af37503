"""Scans and backpropagation through time: ``scan_rnn_backward`` against jax.vjp with autodiff
disabled, variable lengths against each sequence run alone, reversed scans, the stateful carry
across calls, recurrent layers in ``serial``/``stack`` with hand gradients, one forward scan per
hand training step, and the truncated-BPTT data windows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import backprop, losses
from fnn.combinators import serial, stack
from fnn.layers import LSTM, Dense, SimpleRNN, gru_cell, scan_rnn, scan_rnn_backward
from fnn.optim import clip_by_global_norm

from helpers import assert_trees_close, no_autodiff, tree_rel_err, vjp_and_hand
from rnn_reference import (CELLS, LENGTHS, B, F, H, T, carry_of, init, port,
                           torch_weights)

# --------------------------------------------------------------------------- BPTT

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
    assert_trees_close(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(np.asarray(got[1])[2, 2:] == 0) and np.all(np.asarray(got[1])[1, 2:] == 0)


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
    assert_trees_close(grads, total, rtol=1e-10, atol=1e-12)


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
    assert_trees_close(got, want, rtol=1e-9, atol=1e-12)
    # gradient clipping treats these grads as any tree
    clipped, _ = clip_by_global_norm(0.01).update(got, clip_by_global_norm(0.01).init(got))
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(clipped)))
    assert norm == pytest.approx(0.01, rel=1e-9)


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


def test_hand_training_step_runs_one_forward_scan():
    """The hand path runs ``fwd`` once and ``bwd`` from its residuals: one forward loop and
    one reverse error loop in a jitted hand-gradient step."""
    model = serial(LSTM(8, return_sequences=False), Dense(1))
    params, state, _ = init(model, (2, 6, 3))
    vg = jax.jit(backprop.value_and_grad(model, losses.mse))
    hlo = vg.lower(params, state, jnp.ones((2, 6, 3)), jnp.ones((2, 1))).compile().as_text()
    assert hlo.count(" while(") == 2, "expected one forward and one reverse scan"


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
