"""Recurrent cells — Elman RNN, LSTM, GRU: one step, its hand-derived backward, initialization.

A cell is a :class:`Cell`; calling it is the plain op ``cell(params, carry, x_t) -> (carry, h_t)``
and ``cell.backward`` is the step's hand-derived VJP. ``fnn.layers.recurrent`` scans cells over
sequences. Every cell splits into an input projection ``xp = x @ wi + b_in`` (done for all time
steps in one matmul by the runner) and a recurrent step holding the only matmul that must sit
inside the scan, ``gh = h @ wh (+ bh)``.

Each cell has two forms of its step. ``step`` is the plain form (``apply`` scans it and
autodiff differentiates it); ``fwd_step`` is the form the hand path scans: it *emits* what the
backward needs (the residuals: gate pre-activations, or for the LSTM the gate derivative
factors formed from them, from which ``σ'`` and ``tanh'`` keep a saturated unit's gradient in
float32, see :func:`_sech2`) and may be written for speed — the LSTM's applies one ``tanh`` to
all four gate columns, ``σ(u) = (1 + tanh(u/2))/2``, with the halving folded into the weights
(exact: a power of two). Its outputs equal ``step``'s to rounding. The backward works from the
emitted values alone: ``back_inputs`` gathers, for all steps in bulk, what the reverse step
needs, and the reverse scan (``step_back``) turns the carry's error into the gate errors with a
few multiplies and the recurrent matmul per step.

Layouts follow PyTorch's gate order with the weights transposed (``x @ wi`` rather than
``W_ih @ x``), so that ``torch.nn.LSTM``/``GRU``/``RNN`` weights load by a transpose:

- ``rnn_cell``:  ``h' = act(x wi + h wh + b)``; params ``{"wi": (in, H), "wh": (H, H), "b": (H,)}``.
- ``lstm_cell``: ``z = x wi + h wh + b`` split into gates ``i, f, g, o`` (input, forget, cell,
  output); ``i, f, o = σ(·)``, ``g = tanh(·)``; ``c' = f c + i g``, ``h' = o tanh(c')``.
  Params ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``; carry ``(h, c)`` (PyTorch's order).
- ``gru_cell``: ``gi = x wi + bi``, ``gh = h wh + bh``, each split ``r, z, n`` (reset, update,
  new); ``r = σ(gi_r + gh_r)``, ``z = σ(gi_z + gh_z)``, ``n = tanh(gi_n + r ⊙ gh_n)``,
  ``h' = (1 - z) n + z h``. The reset gate multiplies the recurrent term *after* its matmul,
  bias included (PyTorch's and cuDNN's form; Keras ``reset_after=True``).
  Params ``{"wi": (in, 3H), "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``.

Loading PyTorch weights: ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``; for RNN and LSTM
``b = bias_ih_l0 + bias_hh_l0``; for GRU ``bi = bias_ih_l0``, ``bh = bias_hh_l0``.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fnn import activations as acts
from fnn import initializers as inits

__all__ = ["Cell", "rnn_cell", "lstm_cell", "gru_cell", "make_rnn_cell"]

sigmoid = jax.nn.sigmoid  # lax.logistic: one fused op, as plain-JAX references use


class Cell(NamedTuple):
    """A recurrent cell: the op, its hand-derived backward and what the scan runner needs.

    Carries are tuples inside (``(h,)`` or ``(h, c)``); arrays ``[T, B, ...]`` hold all steps.

    **Fields:** ``name``; ``gates`` (the projections have ``gates·H`` columns); ``n_carry``;
    ``bias`` (key of the input-side bias) and ``rec_bias`` (of a recurrent-side bias or
    ``None``); ``init(key, in, H, dtype, wi_init, wh_init) -> params``;

    - ``step(params, carry, xp_t) -> (carry, h_t)``: the plain step (``apply``'s);
    - ``fast(params) -> params``: the parameters ``fwd_step`` runs on (scaled weights);
    - ``fwd_step(fast_params, carry, xp_t) -> (carry, emitted)``: the hand path's step, emitting
      the residuals (gate pre-activations, or factors formed from them);
    - ``output(emitted) -> hs``: every step's output ``h`` (the new carry's ``h``), in bulk;
    - ``back_inputs(emitted, h_prev) -> inputs``: what ``step_back`` reads at each step,
      ``[T, B, ...]``, formed in bulk (``h_prev``: the ``h`` entering each step);
    - ``step_back(inputs_t, dcarry) -> (dxp, dgh, dcarry_prev)``: ``dxp`` is the gradient of the
      input projection, ``dgh`` that of ``h @ wh (+ bh)`` (``None`` when equal to ``dxp``),
      ``dcarry_prev`` that of the previous carry *except* the recurrent term ``dgh @ whᵀ``,
      which the runner adds (a ``None`` entry means zero);
    - ``rec_grad(emitted, dxp) -> dgh`` for all steps in bulk (``None``: ``dgh = dxp``), so that
      the reverse scan keeps ``dxp`` alone;
    - ``in_place``: ``fwd_step``'s first emitted value has ``xp_t``'s shape and the forward scan
      writes it over ``xp_t``, which no step reads again (the LSTM's gate factors: the scan
      then fills no fresh buffer for them, 7% of its training step; the Elman cell's
      pre-activation so written made XLA copy the buffer, 9 → 14 ms: off there).
    """

    name: str
    gates: int
    n_carry: int
    bias: str
    rec_bias: str | None
    init: Callable
    step: Callable
    fast: Callable
    fwd_step: Callable
    output: Callable
    back_inputs: Callable
    step_back: Callable
    rec_grad: Callable | None = None
    in_place: bool = False

    def __call__(self, params, carry, x_t):
        """One step: ``(params, carry, x_t [batch, in]) -> (carry, h_t [batch, H])``."""
        xp = x_t @ params["wi"] + bias(params[self.bias], 2)
        new, h = self.step(params, as_tuple(self, carry), xp)
        return from_tuple(self, new), h

    def backward(self, params, carry, x_t, dcarry, dh=None):
        """Hand-derived VJP of one step with respect to ``(params, carry, x_t)``.

        ``dcarry``: gradient of the new carry; ``dh``: of the output ``h_t`` (added to the
        carry's ``h``, which it equals). Returns ``(dparams, dcarry_prev, dx_t)``.
        """
        c = as_tuple(self, carry)
        fp = self.fast(params)
        _, emitted = self.fwd_step(fp, c, x_t @ fp["wi"] + bias(fp[self.bias], 2))
        inputs = self.back_inputs(tuple(a[None] for a in emitted), c[0][None])
        d = as_tuple(self, dcarry)
        d = (d[0] if dh is None else d[0] + dh,) + d[1:]
        dxp, dgh, dprev = self.step_back(tuple(a[0] for a in inputs), d)
        dgh = dxp if dgh is None else dgh
        dprev = with_recurrent(dprev, dgh @ params["wh"].T)
        grads = {"wi": x_t.T @ dxp, "wh": c[0].T @ dgh, self.bias: jnp.sum(dxp, axis=0)}
        if self.rec_bias:
            grads[self.rec_bias] = jnp.sum(dgh, axis=0)
        return grads, from_tuple(self, dprev), dxp @ params["wi"].T


def as_tuple(cell: Cell, carry):
    """The public carry (``h`` or ``(h, c)``) as the internal tuple."""
    return tuple(carry) if cell.n_carry > 1 else (carry,)


def from_tuple(cell: Cell, carry: tuple):
    """The internal carry tuple as the public carry."""
    return tuple(carry) if cell.n_carry > 1 else carry[0]


def with_recurrent(dprev: tuple, rec):
    """Add the recurrent term ``dgh @ whᵀ`` to the ``h`` entry of a ``step_back`` result."""
    return (rec if dprev[0] is None else dprev[0] + rec,) + tuple(dprev[1:])


def bias(b, ndim):
    """``b`` shaped to broadcast against an array of rank ``ndim`` (explicit, no promotion)."""
    return b.reshape((1,) * (ndim - 1) + b.shape)


def previous(seq, first, mask, reverse):
    """The value entering each step, ``[T, B, H]``: the neighbouring step's ``seq`` entry, or
    ``first`` (the initial carry) at each sequence's first step — for ``reverse`` the step
    before the padding, which ``mask [T, B, 1]`` tells."""
    if not reverse:
        return jnp.concatenate([first[None], seq[:-1]], axis=0)
    prev = jnp.concatenate([seq[1:], first[None]], axis=0)
    if mask is None:
        return prev
    m = jnp.concatenate([mask[1:], jnp.zeros_like(mask[:1])], axis=0)
    return jnp.where(m, prev, first[None])


def _split(z, n):
    """``z [..., n·H]`` into its ``n`` gate blocks (``lax.split``: under autodiff its transpose
    is one concatenate, where ``n`` slices would each pad a full-width array)."""
    return tuple(jnp.split(z, n, axis=-1))


def _scale_columns(params, keys, gates, scales):
    """``params`` with each gate block of the ``keys`` entries times its scale (a power of two,
    so exact)."""
    def scaled(a):
        H = a.shape[-1] // gates
        s = jnp.concatenate([jnp.full((H,), k, a.dtype) for k in scales])
        return a * s.reshape((1,) * (a.ndim - 1) + s.shape)
    return {k: (scaled(v) if k in keys else v) for k, v in params.items()}


def _blocks(init, key, rows, hidden, gates, dtype):
    """``gates`` blocks of shape ``(rows, H)``, each drawn on its own, side by side."""
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, (rows, hidden), dtype) for k in keys], axis=1)


def _init(gates, bias_keys, forget_bias=None):
    def init(key, n_in, hidden, dtype, wi_init=None, wh_init=None):
        ki, kh = jax.random.split(key)
        params = {"wi": _blocks(wi_init or inits.glorot_uniform(), ki, n_in, hidden, gates, dtype),
                  "wh": _blocks(wh_init or inits.orthogonal(), kh, hidden, hidden, gates, dtype)}
        for k in bias_keys:
            params[k] = jnp.zeros((gates * hidden,), dtype)
        if forget_bias is not None:
            params["b"] = params["b"].at[hidden:2 * hidden].set(forget_bias)
        return params
    return init


def _sech2(u):
    """``tanh'(u) = 4e/(1 + e)²``, ``e = exp(−2|u|)``, accurate for every ``u``; ``σ'(u) =
    sech²(u/2)/4``. From stored outputs, ``1 − a²`` (``a = tanh u``; autodiff's ``(1 + a)(1 −
    a)`` too) is 0 in float32 from ``|u| ≈ 9`` on and noise before, and ``σ(1 − σ)`` is 0 from
    ``u ≈ 17`` on."""
    e = jnp.exp(-2 * jnp.abs(u))
    return 4 * e / ((1 + e) * (1 + e))


def _sech2_of(u, a):
    """``sech²u`` from ``u`` and ``a = tanh u`` without a division: ``e (1 + |a|)²``, ``e =
    exp(−2|u|)`` (since ``1 − |a| = 2e/(1 + e) = e (1 + |a|)``); accurate where ``1 − a²`` is
    not, as :func:`_sech2` is."""
    b = 1 + jnp.abs(a)
    return jnp.exp(-2 * jnp.abs(u)) * b * b


def _same(params):
    return params


# --------------------------------------------------------------------------- Elman RNN

@functools.lru_cache(maxsize=None)
def make_rnn_cell(activation=acts.tanh) -> Cell:
    """An Elman cell ``h' = act(a)``, ``a = x wi + h wh + b``, for any fnn activation with a
    ``.grad``. Emits ``a`` (tanh' from ``a``: :func:`_sech2`). Backward: ``da = dh ⊙ act'(a)``;
    ``dxp = dgh = da``.
    (Cached per activation, so that layers sharing one share its compiled scans.)
    """
    if not hasattr(activation, "grad"):
        raise TypeError(f"rnn_cell: activation must be an fnn activation with a .grad "
                        f"(fnn.activations.tanh, relu, ...), got {activation!r}")
    is_tanh = activation is acts.tanh
    act = jnp.tanh if is_tanh else activation

    def step(p, carry, xp):
        h = act(xp + carry[0] @ p["wh"])                         # (B, H)
        return (h,), h

    def fwd_step(p, carry, xp):
        a = xp + carry[0] @ p["wh"]
        return (act(a),), (a,)

    def output(emitted):
        return act(emitted[0])

    def back_inputs(emitted, h_prev):                            # act'(a), in bulk
        return (_sech2(emitted[0]) if is_tanh else activation.grad(emitted[0]),)

    def step_back(k, dcarry):
        return dcarry[0] * k[0], None, (None,)

    name = "rnn" if is_tanh else f"rnn_{getattr(activation, '__name__', 'act')}"
    return Cell(name, 1, 1, "b", None, _init(1, ("b",)), step, _same, fwd_step, output,
                back_inputs, step_back)


rnn_cell = make_rnn_cell(acts.tanh)


# --------------------------------------------------------------------------- LSTM

def _lstm_step(p, carry, xp):
    h, c = carry
    i, f, g, o = _split(xp + h @ p["wh"], 4)                     # (B, H) each
    c_new = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
    h_new = sigmoid(o) * jnp.tanh(c_new)
    return (h_new, c_new), h_new


_LSTM_SCALES = (0.5, 0.5, 1.0, 0.5)     # σ(z) = (1 + tanh(z/2))/2 for i, f, o; tanh(z) for g


def _lstm_fast(p):
    return _scale_columns(p, ("wi", "wh", "b"), 4, _LSTM_SCALES)


def _lstm_fwd_step(p, carry, xp):
    """One ``tanh`` over all ``4H`` gate columns (weights pre-scaled by :func:`_lstm_fast`, so
    ``u = (z/2 | z/2 | z | z/2)``, ``a = tanh u``, ``σ = (1 + a)/2``, ``σ'(z) = sech²(u)/4``),
    and, while ``u`` and ``c`` are at hand, the factors that turn the carry's error into the
    gate errors (:func:`_lstm_step_back`): ``k = [g σ'_i, c σ'_f, σ_i sech²(u_g), tanh c' σ'_o]``
    ``(B, 4H)``, ``σ_o sech² c'`` and ``σ_f``; with ``h'``, these are what it emits. The
    reverse step is then a few multiplies beside its matmul (measured against recomputing
    ``tanh u``, ``sech² u`` there: benchmarks/RESULTS.md, seventh session). ``sech²`` from ``u``
    (:func:`_sech2_of`), not ``1 − a²``: a saturated gate keeps its derivative in float32."""
    h, c = carry
    u = xp + h @ p["wh"]                                         # (B, 4H)
    a = jnp.tanh(u)
    (ai, af, g, ao), (si, sf, sg, so) = _split(a, 4), _split(_sech2_of(u, a), 4)
    i, f, o = 0.5 + 0.5 * ai, 0.5 + 0.5 * af, 0.5 + 0.5 * ao   # σ of the gates
    c_new = f * c + i * g
    tc = jnp.tanh(c_new)
    h_new = o * tc
    k = jnp.concatenate([g * 0.25 * si, c * 0.25 * sf, i * sg, tc * 0.25 * so], axis=-1)
    return (h_new, c_new), (k, o * _sech2_of(c_new, tc), f, h_new)


def _lstm_output(emitted):
    return emitted[3]


def _lstm_back_inputs(emitted, h_prev):
    """The reverse step's inputs: the gate factors ``k``, ``σ_o sech² c'``, ``σ_f``."""
    return emitted[:3]


def _lstm_step_back(k, dcarry):
    """``dc ← dc + dh σ_o sech²c'``; ``dz = k ⊙ [dc, dc, dc, dh]`` (that is ``[dc g σ'_i,
    dc c σ'_f, dc σ_i sech²(u_g), dh tanh c' σ'_o]``); ``dc_prev = dc σ_f``."""
    gates, ko, f = k
    dh, dc = dcarry
    dc = dc + dh * ko
    return gates * jnp.concatenate([dc, dc, dc, dh], axis=-1), None, (None, dc * f)


lstm_cell = Cell("lstm", 4, 2, "b", None, _init(4, ("b",), forget_bias=1.0), _lstm_step,
                 _lstm_fast, _lstm_fwd_step, _lstm_output, _lstm_back_inputs, _lstm_step_back,
                 in_place=True)


# --------------------------------------------------------------------------- GRU

def _gru_gates(p, h, xp):
    """Full-width forms: ``s = σ(xp + gh)`` over all ``3H`` columns (its ``n`` block unused),
    then ``v = xp + [1, 1, r] ⊙ gh = [u_r, u_z, u_n]`` — the same values as per-gate slices of
    ``xp``, but XLA:CPU runs a fusion that slices columns of the step's input ``xp_t`` (itself
    a slice of the projection) ~10× slower per element (benchmarks/RESULTS.md, recurrent)."""
    gh = h @ p["wh"] + bias(p["bh"], 2)                          # (B, 3H): r, z, n
    H = h.shape[-1]
    s = sigmoid(xp + gh)                                         # σ(u_r), σ(u_z), unused
    v = xp + jnp.concatenate([jnp.ones_like(s[:, :2 * H]), s[:, :H]], axis=-1) * gh
    ur, uz, un = _split(v, 3)
    z, n = s[:, H:2 * H], jnp.tanh(un)
    return (ur, uz, un, gh[:, 2 * H:]), n + z * (h - n)          # h' = (1 - z) n + z h


def _gru_step(p, carry, xp):
    """The plain step, per-gate slices: autodiff of the full-width form of :func:`_gru_gates`
    measured 59 -> 88 ms per training step (benchmarks/RESULTS.md, recurrent)."""
    h = carry[0]
    gh = h @ p["wh"] + bias(p["bh"], 2)                          # (B, 3H): r, z, n
    (xr, xz, xn), (hr, hz, hn) = _split(xp, 3), _split(gh, 3)
    z, n = sigmoid(xz + hz), jnp.tanh(xn + sigmoid(xr + hr) * hn)
    h_new = n + z * (h - n)
    return (h_new,), h_new


def _gru_fwd_step(p, carry, xp):
    """Emits the pre-activations ``u_r, u_z, u_n``, ``gh_n`` and ``h'``, each ``(B, H)``: ``u``
    rather than ``σ(u)``, ``tanh u`` (see :func:`_sech2`)."""
    u, h_new = _gru_gates(p, carry[0], xp)
    return (h_new,), u + (h_new,)


def _gru_output(emitted):
    return emitted[4]


def _gru_back_inputs(emitted, h_prev):
    """The reverse step's factors, in bulk from the pre-activations: ``(1 − z) tanh'(u_n)``
    (``1 − z = σ(−u_z)``), ``gh_n σ'(u_r)``, ``(h − n) σ'(u_z)``, ``z`` and ``r``."""
    ur, uz, un, hn, _ = emitted
    return (sigmoid(-uz) * _sech2(un), hn * 0.25 * _sech2(0.5 * ur),
            (h_prev - jnp.tanh(un)) * 0.25 * _sech2(0.5 * uz), sigmoid(uz), sigmoid(ur))


def _gru_step_back(k, dcarry):
    """``dan = dh (1-z) tanh'(u_n)``, ``dar = dan gh_n σ'(u_r)``, ``daz = dh (h - n) σ'(u_z)``;
    ``dxp = [dar, daz, dan]``, ``dgh = [dar, daz, dan r]``, ``dh_prev ∋ dh z``."""
    kn, kr, kz, z, r = k
    dh = dcarry[0]
    dan, daz = dh * kn, dh * kz
    dar = dan * kr
    return (jnp.concatenate([dar, daz, dan], axis=-1),
            jnp.concatenate([dar, daz, dan * r], axis=-1), (dh * z,))


def _gru_rec_grad(emitted, dxp):
    """``dgh`` of every step from ``dxp``: the ``n`` block times ``r = σ(u_r)``."""
    dr, dz, dn = _split(dxp, 3)
    return jnp.concatenate([dr, dz, dn * sigmoid(emitted[0])], axis=-1)


gru_cell = Cell("gru", 3, 1, "bi", "bh", _init(3, ("bi", "bh")), _gru_step, _same,
                _gru_fwd_step, _gru_output, _gru_back_inputs, _gru_step_back, _gru_rec_grad)
