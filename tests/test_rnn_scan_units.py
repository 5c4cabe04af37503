"""The scan runner's paths the layer tests leave unread (float64, against jax.vjp of
``scan_rnn``, autodiff patched to raise while the hand rules are traced): ``scan_rnn_backward``
with no carry gradient or no output gradient, and the initial carry's gradient of a batch run as
two chains (the layers' ``loop="chains2"`` form discards it); ``scan_rnn_backward``'s errors;
the LSTM's reverse scan writing its gate errors in place (traced only: nothing compiles)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers import lstm_cell, scan_rnn, scan_rnn_backward
from fnn.layers._rnn_scan import _bwd_scan, _fwd_scan, prepare

from helpers import assert_trees_close, vjp_and_hand

B, T, F, H = 4, 3, 2, 3


def _data(seed):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(0.5 * rng.normal(size=s))
    p = {"wi": n(F, 4 * H), "wh": n(H, 4 * H), "b": n(4 * H)}
    return p, n(B, T, F), (n(B, H), n(B, H)), n(B, T, H), (n(B, H), n(B, H))


def test_backward_without_a_carry_or_an_output_gradient(monkeypatch):
    """``dcarry=None`` is a zero carry gradient (``(h, c)`` for the LSTM), ``dys=None`` zero
    output gradients."""
    p, x, c0, dys, dc = _data(0)
    run = lambda p, x, c0: scan_rnn(lstm_cell, p, x, c0)
    for d, dys_given, dc_given in (((dys, jax.tree.map(jnp.zeros_like, dc)), dys, None),
                                   ((jnp.zeros_like(dys), dc), None, dc)):
        hand = lambda p, x, c0, _, dy=dys_given, dcT=dc_given: scan_rnn_backward(
            lstm_cell, p, x, dy, dcT, c0)
        want, got = vjp_and_hand(run, (p, x, c0), d, hand, monkeypatch)
        assert_trees_close(got, want, rtol=1e-9, atol=1e-12)


def test_two_chains_give_the_initial_carry_gradient(monkeypatch):
    """The batch as two chains (``split=2``): every gradient, the initial carry's included,
    equals jax.vjp of the one-chain ``scan_rnn`` (with lengths, reversed)."""
    p, x, c0, dys, dc = _data(1)
    lengths = jnp.asarray([3, 1, 0, 2])
    run = lambda p, x, c0: scan_rnn(lstm_cell, p, x, c0, lengths=lengths, reverse=True)

    def hand(p, x, c0, d):
        mask, c = prepare("test", lstm_cell, p, x, lengths, c0)
        _, _, emitted = _fwd_scan(lstm_cell, p, x, c, mask, True, 2)
        assert len(emitted) == 2
        grads, dx, d0 = _bwd_scan(lstm_cell, p, x, emitted, jnp.swapaxes(d[0], 0, 1), d[1], c,
                                  mask, True)
        return grads, dx, d0
    want, got = vjp_and_hand(run, (p, x, c0), (dys, dc), hand, monkeypatch)
    assert_trees_close(got, want, rtol=1e-9, atol=1e-12)


def test_backward_errors_name_the_function():
    p, x, c0, dys, dc = _data(2)
    with pytest.raises(ValueError, match=r"^scan_rnn_backward\(lstm\): dys must have shape "
                                         r"\(4, 3, 3\), got \(4, 3\)$"):
        scan_rnn_backward(lstm_cell, p, x, dys[:, 0], dc, c0)
    with pytest.raises(ValueError, match=r"^scan_rnn_backward\(lstm\): dcarry must be \(h, c\), "
                                         r"each of shape \(batch, hidden\) = \(4, 3\)"):
        scan_rnn_backward(lstm_cell, p, x, dys, dc[0], c0)
    with pytest.raises(ValueError, match=r"^scan_rnn_backward\(lstm\): initial_carry must be"):
        scan_rnn_backward(lstm_cell, p, x, dys, dc, dc[0])


def test_lstm_reverse_scan_writes_gate_errors_in_place():
    """The reverse scan carries the gate factors ``[T, B, 4H]`` and writes each step's gate
    errors over them (:func:`_in_place`), stacking no fresh output."""
    p, x, c0, dys, dc = _data(3)
    emitted = jax.eval_shape(lambda: _fwd_scan(lstm_cell, p, x, c0, None, False)[2])
    jaxpr = jax.make_jaxpr(lambda em, dys, dc: _bwd_scan(
        lstm_cell, p, x, em, dys, dc, c0, None, False))(emitted, jnp.swapaxes(dys, 0, 1), dc)
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    k, n = scan.params["num_consts"], scan.params["num_carry"]
    assert (T, B, 4 * H) in [v.aval.shape for v in scan.invars[k:k + n]]
    assert scan.outvars[n:] == []
