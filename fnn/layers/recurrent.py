"""Recurrent layers — ``SimpleRNN``, ``LSTM``, ``GRU``, ``Bidirectional`` — with backpropagation
through time derived by hand.

The runner :func:`scan_rnn` projects the inputs of all time steps in one matmul
(``xp = x @ wi + b``, ``(batch, time, in) → (time, batch, gates·H)``) and scans the cell's
recurrent step over time. Its backward :func:`scan_rnn_backward` repeats that scan (the very
computation ``apply`` ran, which XLA then keeps once in a jitted training step), forms every
step's gate activations in bulk from what the scan emitted, runs a reverse ``lax.scan`` over the
*errors only* (``δh_{t-1} = δgh_t · whᵀ + ...``, gate derivatives written out in
``fnn.layers.cells``), and gathers every weight gradient afterwards as one einsum over all
steps::

    dwi = Σ_{t,b} x_{tb}ᵀ δxp_{tb}      dwh = Σ_{t,b} h_{t-1,b}ᵀ δgh_{tb}      dx = δxp · wiᵀ

Autodiff of a scan instead forms ``h_{t-1}ᵀ δgh_t`` inside the loop, one small matmul per step.

Variable lengths: ``lengths[b]`` steps of sequence ``b`` are real, the rest padding. Padded steps
leave the carry unchanged, output zeros and receive no gradient; the final carry (and the
"last" output) is each sequence's own. With ``reverse=True`` the scan runs from each sequence's
own last real step back to step 0 (outputs stay in input order, as in PyTorch's bidirectional
layers), so its final carry is the output at step 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fnn import activations as acts
from fnn.core import Example, Layer, default_dtype, examples, is_shape
from fnn.layers._checks import check_param_shapes
from fnn.layers.cells import (Cell, bias, check_carry, check_lengths, check_sequence,
                              from_tuple, gru_cell, lstm_cell, make_rnn_cell, rnn_cell,
                              with_recurrent, zeros_carry)

__all__ = ["rnn_cell", "lstm_cell", "gru_cell", "make_rnn_cell", "Cell", "scan_rnn",
           "scan_rnn_backward", "SimpleRNN", "LSTM", "GRU", "Bidirectional"]


# --------------------------------------------------------------------------- runner

def _project(cell, params, xs):
    # (B, T, F) @ (F, G·H) -> (T, B, G·H): every step's input projection in one matmul
    return jnp.einsum("btf,fg->tbg", xs, params["wi"]) + bias(params[cell.bias], 3)


def _forward(cell, params, xs, carry0, mask, reverse, share=True):
    """Scan the cell over time. Returns ``(final_carry, hs (T, B, H), emitted, xp)``; ``hs`` is
    zero at padding.

    With ``share`` the scan emits what the cell's backward needs and ``hs`` is formed from it;
    ``backward`` calls exactly this, so under ``jit`` XLA runs one scan for both
    (common-subexpression elimination). Without, the scan emits ``h`` alone (cheapest for
    ``jax.grad``), and ``emitted`` is ``None``.
    """
    xp = _project(cell, params, xs)

    def body(carry, inp):
        xp_t, m_t = inp
        new, emitted = cell.step(params, carry, xp_t)
        if m_t is not None:                                      # padding keeps the carry
            new = tuple(jnp.where(m_t, a, b) for a, b in zip(new, carry))
        return new, (emitted if share else new[0])
    final, out = jax.lax.scan(body, carry0, (xp, mask), reverse=reverse)
    hs = cell.output(params, out, xp) if share else out          # (T, B, H), in bulk
    return (final, (hs if mask is None else jnp.where(mask, hs, 0)), out if share else None,
            xp)


def _last_output(hs, final_h, lengths, reverse):
    """Each sequence's own last output, read from ``hs`` (the same value as ``final_h`` where a
    sequence has a step; ``final_h`` where it has none)."""
    if lengths is None:
        return hs[0] if reverse else hs[-1]
    idx = jnp.zeros_like(lengths) if reverse else jnp.maximum(lengths - 1, 0)
    last = jnp.take_along_axis(hs, idx[None, :, None], axis=0)[0]     # (B, H)
    return jnp.where((lengths > 0)[:, None], last, final_h)


def _backward(cell, params, xs, dys, dcarry, carry0, mask, reverse):
    """Hand BPTT. ``dys``: ``(T, B, H)`` or ``None``; ``dcarry``: gradient of the final carry
    (tuple). Returns ``(dparams, dxs (B, T, F), dcarry0)``."""
    _, hs, emitted, xp = _forward(cell, params, xs, carry0, mask, reverse)
    prevs, res = cell.unpack(params, emitted, xp, hs, carry0, mask, reverse)
    wh_t = params["wh"].T
    if dys is not None and mask is not None:
        dys = jnp.where(mask, dys, 0)                            # padded outputs are constants

    def body(d, inp):
        prev, r, dy_t, m_t = inp
        dcar = d if dy_t is None else (d[0] + dy_t,) + d[1:]
        dxp, dgh, dprev = cell.step_back(params, prev, r, dcar)
        dprev = with_recurrent(dprev, (dxp if dgh is None else dgh) @ wh_t)
        if m_t is not None:                                      # padding passes errors through
            dprev = tuple(jnp.where(m_t, a, b) for a, b in zip(dprev, dcar))
            dxp = jnp.where(m_t, dxp, 0)
            dgh = None if dgh is None else jnp.where(m_t, dgh, 0)
        return dprev, (dxp, dgh)

    d0, (dxp, dgh) = jax.lax.scan(body, dcarry, (prevs, res, dys, mask), reverse=not reverse)
    dgh = dxp if dgh is None else dgh                            # (T, B, G·H)
    grads = {"wi": jnp.einsum("btf,tbg->fg", xs, dxp),
             "wh": jnp.einsum("tbh,tbg->hg", prevs[0], dgh),
             cell.bias: jnp.sum(dxp, axis=(0, 1))}
    if cell.rec_bias:
        grads[cell.rec_bias] = jnp.sum(dgh, axis=(0, 1))
    return grads, jnp.einsum("tbg,fg->btf", dxp, params["wi"]), d0


# Compiled once per cell, shapes and options: eager calls reuse the executable, and inside an
# outer ``jit`` they are inlined (apply's and backward's forward scans stay one computation).
_run_forward = jax.jit(_forward, static_argnums=(0, 5, 6))
_run_backward = jax.jit(_backward, static_argnums=(0, 7))


def _prepare(name, cell, params, xs, carry, lengths):
    check_sequence(name, xs, params["wi"].shape[0])
    B, T, _ = xs.shape
    H = params["wh"].shape[0]
    mask = check_lengths(name, lengths, B, T)
    c0 = zeros_carry(cell, B, H, xs.dtype) if carry is None else check_carry(name, cell, carry,
                                                                                 B, H)
    return mask, c0


def scan_rnn(cell: Cell, params, xs, carry=None, *, lengths=None, reverse=False):
    """Run ``cell`` over a batch of sequences.

    **Arguments:** ``xs: [batch, time, in]``; ``carry``: initial carry (``h`` or ``(h, c)``,
    each ``[batch, H]``; default zeros); ``lengths: int[batch]`` real steps per sequence;
    ``reverse``: scan from each sequence's end to its start.
    **Returns:** ``(ys [batch, time, H], final_carry)``; ``ys`` is zero at padded steps.

    >>> ys, (h, c) = scan_rnn(lstm_cell, params, xs)
    """
    mask, c0 = _prepare(f"scan_rnn({cell.name})", cell, params, xs, carry, lengths)
    final, hs, _, _ = _run_forward(cell, params, xs, c0, mask, reverse, True)
    return jnp.swapaxes(hs, 0, 1), from_tuple(cell, final)


def scan_rnn_backward(cell: Cell, params, xs, dys, dcarry=None, carry=None, *, lengths=None,
                      reverse=False):
    """Hand-derived VJP of :func:`scan_rnn` (backpropagation through time).

    ``dys: [batch, time, H]`` or ``None``; ``dcarry``: gradient of the final carry or ``None``.
    **Returns:** ``(dparams, dxs [batch, time, in], dcarry0)``.
    """
    name = f"scan_rnn_backward({cell.name})"
    mask, c0 = _prepare(name, cell, params, xs, carry, lengths)
    B, T, _ = xs.shape
    H = c0[0].shape[1]
    d = zeros_carry(cell, B, H, xs.dtype) if dcarry is None else \
        check_carry(name, cell, dcarry, B, H, "dcarry")
    if dys is not None and tuple(dys.shape) != (B, T, H):
        raise ValueError(f"{name}: dys must have shape {(B, T, H)}, got {tuple(dys.shape)}")
    dys = None if dys is None else jnp.swapaxes(dys, 0, 1)
    grads, dxs, d0 = _run_backward(cell, params, xs, dys, d, c0, mask, reverse)
    return grads, dxs, from_tuple(cell, d0)


# --------------------------------------------------------------------------- layers

def _recurrent_layer(cell, label, hidden, return_sequences, return_carry, reverse, stateful,
                     share_forward, wi_init, wh_init, twin) -> Layer:
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{label}: hidden must be a positive int, got {hidden!r}")
    name = f"{label}({hidden}{', reverse' if reverse else ''})"

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 3:
            raise ValueError(f"{label}: expected input shape (batch, time, features), "
                             f"got {input_shape}")
        B, T, F = input_shape
        params = cell.init(key, F, hidden, default_dtype(), wi_init, wh_init)
        carry = zeros_carry(cell, B, hidden, default_dtype())
        state = {"carry": from_tuple(cell, carry)} if stateful else {}
        out = (B, T, hidden) if return_sequences else (B, hidden)
        if return_carry:
            out = (out, from_tuple(cell, tuple((B, hidden) for _ in carry)))
        return params, state, out

    def _setup(params, state, x, lengths, initial_carry):
        check_sequence(label, x, params["wi"].shape[0])
        g = cell.gates * hidden
        shapes = {"wi": (x.shape[-1], g), "wh": (hidden, g), cell.bias: (g,)}
        check_param_shapes(name, params, {**shapes, **({cell.rec_bias: (g,)}
                                                      if cell.rec_bias else {})})
        B, T, _ = x.shape
        mask = check_lengths(label, lengths, B, T)
        if initial_carry is not None:
            c0 = check_carry(label, cell, initial_carry, B, hidden)
        elif stateful:
            c0 = check_carry(label, cell, state["carry"], B, hidden, "the stateful carry")
        else:
            c0 = zeros_carry(cell, B, hidden, x.dtype)
        return mask, c0

    def apply(params, state, x, *, key=None, train=False, lengths=None, initial_carry=None):
        mask, c0 = _setup(params, state, x, lengths, initial_carry)
        final, hs, _, _ = _run_forward(cell, params, x, c0, mask, reverse, share_forward)
        y = jnp.swapaxes(hs, 0, 1) if return_sequences else \
            _last_output(hs, final[0], None if lengths is None else jnp.asarray(lengths), reverse)
        carry = from_tuple(cell, final)
        return ((y, carry) if return_carry else y), ({"carry": carry} if stateful else state)

    def backward(params, state, x, dy, *, key=None, train=False, lengths=None,
                 initial_carry=None):
        mask, c0 = _setup(params, state, x, lengths, initial_carry)
        dy, dcarry = dy if return_carry else (dy, None)
        d = tuple(jnp.zeros_like(a) for a in c0) if dcarry is None else \
            check_carry(label, cell, dcarry, *c0[0].shape, "dcarry")
        if not return_sequences:                                 # the last output is the carry's h
            d = (d[0] + dy,) + d[1:]
        dys = jnp.swapaxes(dy, 0, 1) if return_sequences else None
        grads, dx, _ = _run_backward(cell, params, x, dys, d, c0, mask, reverse)
        return grads, dx

    apply.recurrent = {"twin": twin, "return_carry": return_carry}   # read by Bidirectional
    return Layer(init, apply, backward, name, frozenset({"lengths", "initial_carry"}))


_OPTIONS = """
    **Options:** ``return_sequences`` (default ``True``): output every step ``[batch, time, H]``
    (zeros at padded steps) or only the last ``[batch, H]`` (each sequence's own last step).
    ``return_carry``: output ``(y, final_carry)``; ``backward`` then takes ``dy`` as the
    matching pair ``(dy, dcarry)`` (``dcarry`` may be ``None``). ``reverse``: run from each
    sequence's end to its start, outputs in input order. ``stateful``: keep the carry in
    ``state["carry"]`` (zeros at ``init``, batch size fixed by ``input_shape``) and return the
    final carry as the new state, for truncated BPTT over long text; reset by re-initializing
    the state. ``share_forward`` (default ``True``): the scan of ``apply`` emits the gate values
    that ``backward`` needs, so that in a jitted training step with the hand-derived backward
    (``fnn.backprop``) XLA runs the forward scan once; ``False`` emits ``h`` alone, which makes
    ``jax.grad`` of ``apply`` some 5–20% cheaper and the hand-derived step dearer (values are
    identical either way). ``wi_init``/``wh_init``: per-gate initializers (default Glorot
    uniform and orthogonal, as the lesson advises).
    **Call keywords:** ``lengths: int[batch]`` (real steps per sequence; checked against the
    time axis outside ``jit``, clamped inside it); ``initial_carry`` (overrides the state's;
    in a ``serial`` every recurrent layer receives the same one — use ``stateful`` for stacks).
    **Input:** ``[batch, time, in]``.
    Backward: hand-derived BPTT (see the module docstring); no gradient flows into the initial
    carry through ``backward`` (use :func:`scan_rnn_backward` for that).
"""


def _lengths_kw(key, shape):
    return {"lengths": jnp.array([shape[1], 1, shape[1] - 1][:shape[0]])}


def _carry_kw(n):
    def make(key, shape):
        keys = jax.random.split(key, n)
        c = tuple(jax.random.normal(k, (shape[0], 3), default_dtype()) for k in keys)
        return {"initial_carry": c if n > 1 else c[0]}
    return make


_RNN_EXAMPLE = Example((3, 5, 2), (3,), {"return_sequences": False, "reverse": True,
                                        "stateful": True}, call_kwargs=_lengths_kw)
_LSTM_EXAMPLE = Example((2, 4, 3), (3,), {"return_carry": True, "share_forward": False},
                        call_kwargs=_carry_kw(2))
_GRU_EXAMPLE = Example((3, 4, 2), (3,), {"return_carry": True}, call_kwargs=_lengths_kw)


@examples(_RNN_EXAMPLE)
def SimpleRNN(hidden: int, activation=acts.tanh, *, return_sequences=True, return_carry=False,
              reverse=False, stateful=False, share_forward=True, wi_init=None,
              wh_init=None) -> Layer:
    """Elman RNN ``h_t = act(x_t wi + h_{t-1} wh + b)`` over ``[batch, time, in]`` sequences.

    **Params:** ``{"wi": (in, H), "wh": (H, H), "b": (H,)}``; carry ``h [batch, H]``.
    PyTorch ``nn.RNN`` (batch_first): ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``,
    ``b = bias_ih_l0 + bias_hh_l0``.
    """
    cell = rnn_cell if activation is acts.tanh else make_rnn_cell(activation)
    kw = dict(return_sequences=return_sequences, return_carry=return_carry, stateful=stateful,
              share_forward=share_forward, wi_init=wi_init, wh_init=wh_init)
    return _recurrent_layer(cell, "SimpleRNN", hidden, reverse=reverse,
                            twin=lambda: SimpleRNN(hidden, activation, reverse=not reverse, **kw),
                            **kw)


@examples(_LSTM_EXAMPLE)
def LSTM(hidden: int, *, return_sequences=True, return_carry=False, reverse=False,
         stateful=False, share_forward=True, wi_init=None, wh_init=None) -> Layer:
    """Long short-term memory over ``[batch, time, in]`` sequences (Hochreiter & Schmidhuber).

    ``[i f g o] = x_t wi + h_{t-1} wh + b``; ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``;
    ``h_t = σ(o) tanh(c_t)``. **Params:** ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``,
    gates in PyTorch's order input, forget, cell, output; forget-gate bias initialized to 1.
    Carry ``(h, c)``. PyTorch ``nn.LSTM``: ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``,
    ``b = bias_ih_l0 + bias_hh_l0``.
    """
    kw = dict(return_sequences=return_sequences, return_carry=return_carry, stateful=stateful,
              share_forward=share_forward, wi_init=wi_init, wh_init=wh_init)
    return _recurrent_layer(lstm_cell, "LSTM", hidden, reverse=reverse,
                            twin=lambda: LSTM(hidden, reverse=not reverse, **kw), **kw)


@examples(_GRU_EXAMPLE)
def GRU(hidden: int, *, return_sequences=True, return_carry=False, reverse=False,
        stateful=False, share_forward=True, wi_init=None, wh_init=None) -> Layer:
    """Gated recurrent unit over ``[batch, time, in]`` sequences (Cho et al., 2014).

    ``[r z n]`` gates: ``r = σ(x wi_r + bi_r + h wh_r + bh_r)``, ``z`` likewise,
    ``n = tanh(x wi_n + bi_n + r ⊙ (h wh_n + bh_n))``, ``h_t = (1 - z) n + z h_{t-1}`` — reset
    applied after the recurrent matmul (PyTorch/cuDNN). **Params:** ``{"wi": (in, 3H),
    "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``; carry ``h``. PyTorch ``nn.GRU``:
    ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``, ``bi = bias_ih_l0``, ``bh = bias_hh_l0``.
    """
    kw = dict(return_sequences=return_sequences, return_carry=return_carry, stateful=stateful,
              share_forward=share_forward, wi_init=wi_init, wh_init=wh_init)
    return _recurrent_layer(gru_cell, "GRU", hidden, reverse=reverse,
                            twin=lambda: GRU(hidden, reverse=not reverse, **kw), **kw)


for _f in (SimpleRNN, LSTM, GRU):
    _f.__doc__ += _OPTIONS


# --------------------------------------------------------------------------- Bidirectional

def _split_pair(name, what, pair):
    if pair is None:
        return None, None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name}: {what} must be a pair (forward, backward), "
                         f"got {type(pair).__name__}")
    return pair


@examples(Example((3, 5, 2), (GRU(3, return_sequences=False, return_carry=True), "sum"),
                  call_kwargs=_lengths_kw))
def Bidirectional(layer: Layer, merge: str = "concat") -> Layer:
    """Run a recurrent layer forwards and a mirrored copy backwards; merge their outputs.

    ``layer``: a ``SimpleRNN``, ``LSTM`` or ``GRU``; the backward copy is built from the same
    options with ``reverse`` flipped (own parameters). ``merge``: ``"concat"`` (last axis,
    forward first, as PyTorch) or ``"sum"``. With ``return_sequences=False`` the merged outputs
    are the forward direction's last step and the backward direction's step 0 (Keras's
    convention). With ``return_carry`` the output is ``(y, (carry_fwd, carry_bwd))`` and the
    ``initial_carry`` keyword takes such a pair too.
    **Params:** ``{"forward": ..., "backward": ...}`` (PyTorch's ``*_reverse`` weights load into
    ``"backward"``). Backward: each direction's hand BPTT; ``dx`` is their sum.
    """
    info = getattr(getattr(layer, "apply", None), "recurrent", None)
    if info is None:
        raise TypeError(f"Bidirectional: expected a SimpleRNN, LSTM or GRU layer, got "
                        f"{getattr(layer, 'name', type(layer).__name__)}")
    if merge not in ("concat", "sum"):
        raise ValueError(f"Bidirectional: merge must be 'concat' or 'sum', got {merge!r}")
    fwd, bwd, rc = layer, info["twin"](), info["return_carry"]

    def merged(yf, yb):
        return jnp.concatenate([yf, yb], axis=-1) if merge == "concat" else yf + yb

    def init(key, input_shape):
        kf, kb = jax.random.split(key)
        pf, sf, of = fwd.init(kf, input_shape)
        pb, sb, ob = bwd.init(kb, input_shape)
        y, c = (of[0], (of[1], ob[1])) if rc else (of, None)
        y = y[:-1] + (2 * y[-1],) if merge == "concat" else y
        return {"forward": pf, "backward": pb}, {"forward": sf, "backward": sb}, \
            ((y, c) if rc else y)

    def _kw(initial_carry, lengths):
        cf, cb = _split_pair("Bidirectional", "initial_carry", initial_carry)
        return {"lengths": lengths, "initial_carry": cf}, {"lengths": lengths, "initial_carry": cb}

    def apply(params, state, x, *, key=None, train=False, lengths=None, initial_carry=None):
        kf, kb = _kw(initial_carry, lengths)
        yf, sf = fwd.apply(params["forward"], state["forward"], x, **kf)
        yb, sb = bwd.apply(params["backward"], state["backward"], x, **kb)
        new_state = {"forward": sf, "backward": sb}
        if rc:
            return (merged(yf[0], yb[0]), (yf[1], yb[1])), new_state
        return merged(yf, yb), new_state

    def backward(params, state, x, dy, *, key=None, train=False, lengths=None,
                 initial_carry=None):
        kf, kb = _kw(initial_carry, lengths)
        dy, dc = dy if rc else (dy, None)
        dcf, dcb = _split_pair("Bidirectional", "dcarry", dc)
        dyf, dyb = jnp.split(dy, 2, axis=-1) if merge == "concat" else (dy, dy)
        gf, dxf = fwd.backward(params["forward"], state["forward"], x,
                               (dyf, dcf) if rc else dyf, **kf)
        gb, dxb = bwd.backward(params["backward"], state["backward"], x,
                               (dyb, dcb) if rc else dyb, **kb)
        return {"forward": gf, "backward": gb}, dxf + dxb

    return Layer(init, apply, backward, f"Bidirectional({fwd.name}, {merge})",
                 frozenset({"lengths", "initial_carry"}), (("forward", fwd), ("backward", bwd)))
