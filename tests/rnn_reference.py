"""Shared by the recurrent tests: the sizes, float64 NumPy loops written from PyTorch's
equations (weights in PyTorch's own layout, ported as the docstrings say) and a fast ``init``.
Not a test module: ``test_recurrent.py`` (layers, Bidirectional), ``test_recurrent_cells.py``
(cells) and ``test_recurrent_scan.py`` (scans, BPTT, lengths, state) import it."""
import jax
import jax.numpy as jnp
import numpy as np

from fnn.layers import GRU, LSTM, SimpleRNN, gru_cell, lstm_cell, rnn_cell


CELLS = {"rnn": (SimpleRNN, rnn_cell, 1, 1), "lstm": (LSTM, lstm_cell, 4, 2),
         "gru": (GRU, gru_cell, 3, 1)}
B, T, F, H = 3, 5, 2, 4
LENGTHS = np.array([5, 2, 0])


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
