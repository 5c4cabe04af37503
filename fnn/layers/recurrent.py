"""Recurrent layers — ``SimpleRNN``, ``LSTM``, ``GRU``, ``Bidirectional`` — with backpropagation
through time derived by hand.

Each layer is defined by its residual pair: ``fwd`` scans the cell's fast step and keeps the
input and what every step emits (gate pre-activations or derivative factors) as residuals;
``bwd`` runs the hand BPTT of ``fnn.layers._rnn_scan`` from them (``backward`` is ``bwd`` of
``fwd``). ``apply`` scans the plain step, the form autodiff differentiates; ``fwd``'s outputs
equal ``apply``'s to rounding. Variable lengths, reverse scans and carries are described in
``fnn.layers._rnn_scan``.
"""
from __future__ import annotations

from types import MappingProxyType

import jax
import jax.numpy as jnp

from fnn import activations as acts
from fnn.core import Example, Layer, constructor, default_dtype, examples, is_shape
from fnn.layers._param_shapes import check_param_shapes
from fnn.layers._rnn_scan import (prepare, run_apply, run_bwd, run_fwd, scan_rnn,
                                  scan_rnn_backward)
from fnn.layers._rnn_checks import check_carry, zeros_carry
from fnn.layers._rnn_tuning import check_loop, loop_form
from fnn.layers.cells import Cell, from_tuple, gru_cell, lstm_cell, make_rnn_cell, rnn_cell

__all__ = ["rnn_cell", "lstm_cell", "gru_cell", "make_rnn_cell", "Cell", "scan_rnn",
           "scan_rnn_backward", "SimpleRNN", "LSTM", "GRU", "Bidirectional"]


# --------------------------------------------------------------------------- layers

def _recurrent_layer(cell, label, hidden, return_sequences, return_carry, reverse, stateful,
                     wi_init, wh_init, loop, twin) -> Layer:
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{label}: hidden must be a positive int, got {hidden!r}")
    check_loop(label, loop)
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

    def setup(params, state, x, lengths, initial_carry):
        g = cell.gates * hidden
        shapes = {"wi": (x.shape[-1], g), "wh": (hidden, g), cell.bias: (g,)}
        check_param_shapes(name, params, {**shapes, **({cell.rec_bias: (g,)}
                                                      if cell.rec_bias else {})})
        if initial_carry is None and stateful:
            return prepare(label, cell, params, x, lengths, state["carry"], "the stateful carry")
        return prepare(label, cell, params, x, lengths, initial_carry)

    def finish(hs, final, state):
        # the last output of each sequence is its final carry's h (padding keeps the carry;
        # a reversed scan ends at step 0; an empty sequence keeps its initial carry)
        y = jnp.swapaxes(hs, 0, 1) if return_sequences else final[0]
        carry = from_tuple(cell, final)
        return ((y, carry) if return_carry else y), ({"carry": carry} if stateful else state)

    def apply(params, state, x, *, key=None, train=False, lengths=None, initial_carry=None):
        mask, c0 = setup(params, state, x, lengths, initial_carry)
        final, hs = run_apply(cell, params, x, c0, mask, reverse, return_sequences)
        return finish(hs, final, state)

    def fwd(params, state, x, *, key=None, train=False, lengths=None, initial_carry=None):
        mask, c0 = setup(params, state, x, lengths, initial_carry)
        split = loop_form(cell, loop, params, x, mask, reverse, return_sequences)
        if x.shape[0] % split:
            raise ValueError(f"{name}: loop={loop!r} runs the batch as {split} chains, so the "
                             f"batch size must be a multiple of {split}, got {x.shape[0]}")
        final, hs, emitted = run_fwd(cell, params, x, c0, mask, reverse, split)
        return (*finish(hs, final, state), {"x": x, "gates": emitted})

    def bwd(params, state, res, dy, *, key=None, train=False, lengths=None, initial_carry=None):
        x = res["x"]
        mask, c0 = setup(params, state, x, lengths, initial_carry)
        dy, dcarry = dy if return_carry else (dy, None)
        d = tuple(jnp.zeros_like(a) for a in c0) if dcarry is None else \
            check_carry(label, cell, dcarry, *c0[0].shape, "dcarry")
        want = tuple(x.shape[:2]) + (hidden,) if return_sequences else (x.shape[0], hidden)
        if getattr(dy, "shape", None) != want:
            raise ValueError(f"{label}: the output gradient dy must have the output's shape "
                             f"{want}, got {getattr(dy, 'shape', type(dy).__name__)}")
        if not return_sequences:                                 # the last output is the carry's h
            d = (d[0] + dy,) + d[1:]
        dys = jnp.swapaxes(dy, 0, 1) if return_sequences else None
        grads, dx, _ = run_bwd(cell, params, x, res["gates"], dys, d, c0, mask, reverse)
        return grads, dx

    meta = MappingProxyType({"twin": twin, "return_carry": return_carry, "reverse": reverse,
                             "cell": cell.name})
    return Layer(init, apply, fwd, bwd, name, keywords={"lengths", "initial_carry"}, meta=meta)


_OPTIONS = """
    **Options:** ``return_sequences`` (default ``True``): output every step ``[batch, time, H]``
    (zeros at padded steps) or only the last ``[batch, H]`` (each sequence's own last step).
    ``return_carry``: output ``(y, final_carry)``; ``backward`` then takes ``dy`` as the
    matching pair ``(dy, dcarry)`` (``dcarry`` may be ``None``). ``reverse``: run from each
    sequence's end to its start, outputs in input order. ``stateful``: keep the carry in
    ``state["carry"]`` (zeros at ``init``, batch size fixed by ``input_shape``) and return the
    final carry as the new state, for truncated BPTT over long text; reset by re-initializing
    the state. ``wi_init``/``wh_init``: per-gate initializers (default Glorot uniform and
    orthogonal, as the lesson advises). ``loop``: how the hand path (``fwd``/``bwd``) walks
    over time: ``"auto"`` (default) lets the tuner (:mod:`fnn.tuning`, choice point
    ``recurrent.loop``) time the exact forms ``"scan"`` and ``"chains2"`` (the batch as two
    independent halves per step, for an even batch) on the shapes at hand and keep the
    fastest; with the tuner off (``FNN_TUNE=off``) and off the CPU it is ``"scan"``. ``apply``
    (autodiff's path) always scans one step at a time.
    **Call keywords:** ``lengths: int[batch]`` (real steps per sequence; checked against the
    time axis outside ``jit``, clamped inside it); ``initial_carry`` (overrides the state's;
    in a ``serial`` every recurrent layer receives the same one — use ``stateful`` for stacks).
    **Input:** ``[batch, time, in]``.
    **Residuals:** ``fwd`` returns ``{"x": x, "gates": ...}``, the input and what every step
    emits, per batch chain of the loop form (a tuple of one or two entries, ``[time, batch/n,
    ...]``); ``bwd`` runs hand-derived BPTT from them (see the module docstring). No gradient
    flows into the initial carry through ``backward`` (use :func:`scan_rnn_backward` for that).
    ``meta``: ``twin`` (constructor of the mirrored layer, for ``Bidirectional``),
    ``return_carry``, ``reverse``, ``cell``.
"""


def _lengths_kw(key, shape):
    return {"lengths": jnp.array([shape[1], 1, shape[1] - 1][:shape[0]])}


def _carry_kw(n):
    def make(key, shape):
        keys = jax.random.split(key, n)
        c = tuple(jax.random.normal(k, (shape[0], 3), default_dtype()) for k in keys)
        return {"initial_carry": c if n > 1 else c[0]}
    return make


def _pair_kw(make):
    def pair(key, shape):
        kf, kb = jax.random.split(key)
        return {"initial_carry": (make(kf, shape)["initial_carry"],
                                  make(kb, shape)["initial_carry"])}
    return pair


_RNN_EXAMPLE = Example((3, 5, 2), (3,), {"return_sequences": False, "reverse": True,
                                        "stateful": True}, call_kwargs=_lengths_kw)
_LSTM_EXAMPLE = Example((2, 4, 3), (3,), {"return_carry": True}, call_kwargs=_carry_kw(2))
_LSTM_EXAMPLE_2 = Example((3, 4, 2), (3,), {"reverse": True, "stateful": True},
                          call_kwargs=_lengths_kw)
_GRU_EXAMPLE = Example((3, 4, 2), (3,), {"return_carry": True}, call_kwargs=_lengths_kw)


@examples(_RNN_EXAMPLE)
@constructor
def SimpleRNN(hidden: int, activation=acts.tanh, *, return_sequences=True, return_carry=False,
              reverse=False, stateful=False, wi_init=None, wh_init=None, loop="auto") -> Layer:
    """Elman RNN ``h_t = act(x_t wi + h_{t-1} wh + b)`` over ``[batch, time, in]`` sequences.

    **Params:** ``{"wi": (in, H), "wh": (H, H), "b": (H,)}``; carry ``h [batch, H]``.
    PyTorch ``nn.RNN`` (batch_first): ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``,
    ``b = bias_ih_l0 + bias_hh_l0``.
    """
    cell = rnn_cell if activation is acts.tanh else make_rnn_cell(activation)
    kw = dict(return_sequences=return_sequences, return_carry=return_carry, stateful=stateful,
              wi_init=wi_init, wh_init=wh_init, loop=loop)
    return _recurrent_layer(cell, "SimpleRNN", hidden, reverse=reverse,
                            twin=lambda: SimpleRNN(hidden, activation, reverse=not reverse, **kw),
                            **kw)


@examples(_LSTM_EXAMPLE, _LSTM_EXAMPLE_2)
@constructor
def LSTM(hidden: int, *, return_sequences=True, return_carry=False, reverse=False,
         stateful=False, wi_init=None, wh_init=None, loop="auto") -> Layer:
    """Long short-term memory over ``[batch, time, in]`` sequences (Hochreiter & Schmidhuber).

    ``[i f g o] = x_t wi + h_{t-1} wh + b``; ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``;
    ``h_t = σ(o) tanh(c_t)``. **Params:** ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``,
    gates in PyTorch's order input, forget, cell, output; forget-gate bias initialized to 1.
    Carry ``(h, c)``. PyTorch ``nn.LSTM``: ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``,
    ``b = bias_ih_l0 + bias_hh_l0``. ``fwd`` applies one ``tanh`` to all four gate columns
    (``σ(u) = (1 + tanh(u/2))/2``); its outputs equal ``apply``'s to rounding.
    """
    kw = dict(return_sequences=return_sequences, return_carry=return_carry, stateful=stateful,
              wi_init=wi_init, wh_init=wh_init, loop=loop)
    return _recurrent_layer(lstm_cell, "LSTM", hidden, reverse=reverse,
                            twin=lambda: LSTM(hidden, reverse=not reverse, **kw), **kw)


@examples(_GRU_EXAMPLE)
@constructor
def GRU(hidden: int, *, return_sequences=True, return_carry=False, reverse=False,
        stateful=False, wi_init=None, wh_init=None, loop="auto") -> Layer:
    """Gated recurrent unit over ``[batch, time, in]`` sequences (Cho et al., 2014).

    ``[r z n]`` gates: ``r = σ(x wi_r + bi_r + h wh_r + bh_r)``, ``z`` likewise,
    ``n = tanh(x wi_n + bi_n + r ⊙ (h wh_n + bh_n))``, ``h_t = (1 - z) n + z h_{t-1}`` — reset
    applied after the recurrent matmul (PyTorch/cuDNN). **Params:** ``{"wi": (in, 3H),
    "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``; carry ``h``. PyTorch ``nn.GRU``:
    ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``, ``bi = bias_ih_l0``, ``bh = bias_hh_l0``.
    """
    kw = dict(return_sequences=return_sequences, return_carry=return_carry, stateful=stateful,
              wi_init=wi_init, wh_init=wh_init, loop=loop)
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
                  call_kwargs=_lengths_kw),
          Example((2, 4, 3), (LSTM(3, return_carry=True),), call_kwargs=_pair_kw(_carry_kw(2))))
@constructor
def Bidirectional(layer: Layer, merge: str = "concat") -> Layer:
    """Run a recurrent layer forwards and a mirrored copy backwards; merge their outputs.

    ``layer``: a ``SimpleRNN``, ``LSTM`` or ``GRU``, or any layer whose ``meta`` names its
    mirrored ``twin`` (a constructor) and ``return_carry``; the backward copy is ``twin()`` (own
    parameters). ``merge``: ``"concat"`` (last axis, forward first, as PyTorch) or ``"sum"``.
    With ``return_sequences=False`` the merged outputs are the forward direction's last step
    and the backward direction's step 0 (Keras's convention). With ``return_carry`` the output
    is ``(y, (carry_fwd, carry_bwd))`` and the ``initial_carry`` keyword takes such a pair too.
    **Params:** ``{"forward": ..., "backward": ...}`` (PyTorch's ``*_reverse`` weights load into
    ``"backward"``). **Residuals:** ``{"forward": ..., "backward": ...}``, each direction's own.
    Backward: each direction's hand BPTT; ``dx`` is their sum.
    """
    meta = getattr(layer, "meta", None) or {}
    if not isinstance(layer, Layer) or "twin" not in meta:
        raise TypeError(f"Bidirectional: expected a SimpleRNN, LSTM or GRU layer (one whose "
                        f"meta names its 'twin'), got "
                        f"{getattr(layer, 'name', type(layer).__name__)}")
    if merge not in ("concat", "sum"):
        raise ValueError(f"Bidirectional: merge must be 'concat' or 'sum', got {merge!r}")
    fl, bl, rc = layer, meta["twin"](), bool(meta.get("return_carry", False))
    dirs = (("forward", fl), ("backward", bl))

    def merged(yf, yb):
        return jnp.concatenate([yf, yb], axis=-1) if merge == "concat" else yf + yb

    def init(key, input_shape):
        kf, kb = jax.random.split(key)
        pf, sf, of = fl.init(kf, input_shape)
        pb, sb, ob = bl.init(kb, input_shape)
        y, c = (of[0], (of[1], ob[1])) if rc else (of, None)
        y = y[:-1] + (2 * y[-1],) if merge == "concat" else y
        return {"forward": pf, "backward": pb}, {"forward": sf, "backward": sb}, \
            ((y, c) if rc else y)

    def kws(initial_carry, lengths):
        cs = _split_pair("Bidirectional", "initial_carry", initial_carry)
        return [{"lengths": lengths, "initial_carry": c} for c in cs]

    def run(method, params, state, x, lengths, initial_carry):
        outs = [getattr(l, method)(params[n], state[n], x, **k)
                for (n, l), k in zip(dirs, kws(initial_carry, lengths))]
        (yf, yb), new_state = [o[0] for o in outs], {n: o[1] for (n, _), o in zip(dirs, outs)}
        y = (merged(yf[0], yb[0]), (yf[1], yb[1])) if rc else merged(yf, yb)
        return y, new_state, {n: o[2] for (n, _), o in zip(dirs, outs) if len(o) > 2}

    def apply(params, state, x, *, key=None, train=False, lengths=None, initial_carry=None):
        return run("apply", params, state, x, lengths, initial_carry)[:2]

    def fwd(params, state, x, *, key=None, train=False, lengths=None, initial_carry=None):
        return run("fwd", params, state, x, lengths, initial_carry)

    def bwd(params, state, res, dy, *, key=None, train=False, lengths=None, initial_carry=None):
        dy, dc = dy if rc else (dy, None)
        dcs = _split_pair("Bidirectional", "dcarry", dc)
        dys = jnp.split(dy, 2, axis=-1) if merge == "concat" else (dy, dy)
        grads, dx = {}, 0
        for (n, l), k, d, c in zip(dirs, kws(initial_carry, lengths), dys, dcs):
            grads[n], dxn = l.bwd(params[n], state[n], res[n], (d, c) if rc else d, **k)
            dx = dx + dxn
        return grads, dx

    return Layer(init, apply, fwd, bwd, f"Bidirectional({fl.name}, {merge})",
                 keywords={"lengths", "initial_carry"}, children=dirs,
                 meta={"return_carry": rc, "merge": merge})
