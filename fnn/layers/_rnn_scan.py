"""The scan runner of the recurrent layers: forward scans and backpropagation through time
derived by hand.

The runner projects the inputs of all time steps in one matmul (``x @ wi``,
``(batch, time, in) → (time, batch, gates·H)``) and scans the cell's recurrent step over time
(``xp_t = x_t wi + b`` is completed inside the step).
``apply`` (and :func:`scan_rnn`) scans the plain step, which autodiff differentiates. The
layers' ``fwd`` scans the cell's ``fwd_step`` instead, which may be written for speed and emits
every step's gate pre-activations; those, with the input, are the residuals. ``bwd`` (and
:func:`scan_rnn_backward`) runs a reverse ``lax.scan`` over the *errors only*, reading each
step's activations (``δh_{t-1} = δgh_t · whᵀ + ...``, gate derivatives written
out in ``fnn.layers.cells``), and gathers every weight gradient afterwards as one einsum over
all steps::

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

from fnn.layers._rnn_checks import check_carry, check_lengths, check_sequence, zeros_carry
from fnn.layers.cells import Cell, bias, from_tuple, previous, with_recurrent

__all__ = ["scan_rnn", "scan_rnn_backward"]


# --------------------------------------------------------------------------- runner

def _project(params, xs):
    # (B, T, F) -> (T, B, F), then (T·B, F) @ (F, G·H): every step's input projection in one
    # matmul, laid out time-major (transposing the narrow input, not the wide projection)
    return jnp.einsum("tbf,fg->tbg", jnp.swapaxes(xs, 0, 1), params["wi"])


def _scan(cell, step, params, xs, carry0, mask, reverse, split=1):
    """Scan ``step(params, carry, xp_t) -> (carry, out)`` over time, ``xp_t = x_t wi + b``;
    padding keeps the carry. The bias is added inside the step, where it fuses with the
    recurrent term, rather than over the whole projection (measured in
    benchmarks/RESULTS.md, recurrent). ``split``: the batch as that many independent chains
    in each step (:func:`_chunked`)."""
    b = bias(params[cell.bias], 2)

    def body(carry, inp):
        xp_t, m_t = inp
        new, out = step(params, carry, xp_t + b)
        if m_t is not None:
            new = tuple(jnp.where(m_t, n, c) for n, c in zip(new, carry))
        return new, out
    final, ys = jax.lax.scan(_chunked(body, split), _chunks(carry0, split, 0),
                             _chunks((_project(params, xs), mask), split, 1), reverse=reverse)
    return _unchunk(final, split, 0), _unchunk(ys, split, 1)


def _chunks(tree, k, axis):
    """Each leaf's batch axis ``axis`` as ``(k, batch/k)`` (a free reshape)."""
    if k == 1:
        return tree
    return jax.tree.map(lambda a: a.reshape(a.shape[:axis] + (k, -1) + a.shape[axis + 1:]), tree)


def _unchunk(tree, k, axis):
    """The inverse of :func:`_chunks`."""
    if k == 1:
        return tree
    return jax.tree.map(lambda a: a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:]), tree)


def _chunked(body, k):
    """``body`` over arguments whose leaves lead with ``k`` batch chunks: ``k`` calls, one per
    chunk, their results stacked. Each chunk's matmul and elementwise work is an independent
    chain that XLA:CPU may run beside the others (``k = 1``: ``body`` itself)."""
    if k == 1:
        return body

    def run(*args):
        outs = [body(*jax.tree.map(lambda a, j=j: a[j], args)) for j in range(k)]
        return jax.tree.map(lambda *o: jnp.stack(o), *outs)
    return run


def _masked(hs, mask):
    return hs if mask is None else jnp.where(mask, hs, 0)


def _apply_scan(cell, params, xs, carry0, mask, reverse, sequences=True):
    """The plain forward: ``(final_carry, hs (T, B, H))``, ``hs`` zero at padding (``None``
    without ``sequences``: the scan then emits nothing, as a plain-JAX loop would)."""
    step = cell.step if sequences else lambda p, c, xp: (cell.step(p, c, xp)[0], None)
    final, hs = _scan(cell, step, params, xs, carry0, mask, reverse)
    return final, (_masked(hs, mask) if sequences else None)


def _fwd_scan(cell, params, xs, carry0, mask, reverse, split=1):
    """The hand path's forward: ``(final_carry, hs, emitted)``, ``emitted`` being every step's
    gate pre-activations ``[T, B, ...]`` (the residuals); ``split``: the batch as that many
    chains per step (the loop form, :mod:`fnn.layers._rnn_tuning`)."""
    final, emitted = _scan(cell, cell.fwd_step, cell.fast(params), xs, carry0, mask, reverse,
                           split)
    return final, _masked(cell.output(emitted)[0], mask), emitted


def _bwd_scan(cell, params, xs, emitted, dys, dcarry, carry0, mask, reverse, split=1):
    """Hand BPTT from the residuals. ``dys``: ``(T, B, H)`` or ``None``; ``dcarry``: gradient of
    the final carry (tuple); ``split``: as in :func:`_fwd_scan`. Returns
    ``(dparams, dxs (B, T, F), dcarry0)``."""
    carries = cell.output(emitted)[1]
    prevs = tuple(previous(s, c, mask, reverse) for s, c in zip(carries, carry0))
    inputs = cell.back_inputs(emitted, prevs)                    # in bulk, (T, B, ...)
    wh_t = params["wh"].T
    if dys is not None and mask is not None:
        dys = jnp.where(mask, dys, 0)                            # padded outputs are constants

    def body(d, k, dy_t, m_t):
        dcar = d if dy_t is None else (d[0] + dy_t,) + d[1:]
        dxp, dgh, dprev = cell.step_back(k, dcar)
        dprev = with_recurrent(dprev, (dxp if dgh is None else dgh) @ wh_t)
        if m_t is not None:                                      # padding passes errors through
            dprev = tuple(jnp.where(m_t, a, b) for a, b in zip(dprev, dcar))
            dxp = jnp.where(m_t, dxp, 0)
        return dprev, dxp

    d0, dxp = _reverse_scan(body, dcarry, inputs, dys, mask, reverse, params["wi"].shape[1],
                            split)
    xt = jnp.swapaxes(xs, 0, 1)                                  # (T, B, F)
    dgh = dxp if cell.rec_grad is None else cell.rec_grad(emitted, dxp)   # (T, B, G·H)
    grads = {"wi": _gather(xt, dxp), "wh": _gather(prevs[0], dgh)}
    if cell.rec_bias:
        grads[cell.rec_bias] = jnp.sum(dgh, axis=(0, 1))
    grads[cell.bias] = jnp.sum(dxp, axis=(0, 1))
    return grads, jnp.swapaxes(jnp.einsum("tbg,fg->tbf", dxp, params["wi"]), 0, 1), d0


def _reverse_scan(body, dcarry, inputs, dys, mask, reverse, width, split=1):
    """``lax.scan`` of ``body(d, inputs_t, dy_t, m_t) -> (d, dxp_t)`` against the forward's
    direction; returns ``(d0, dxp [T, B, G·H])``. When ``inputs[0]`` has ``dxp``'s shape (the
    LSTM's gate pre-activations, the Elman cell's derivatives), each step reads its slice and
    writes ``dxp_t`` over it: the scan carries that one buffer instead of stacking its outputs
    into a zero-filled one (an 8 MB fill and copy per call at the benchmark's shape), and each
    write goes to memory the step has just read (benchmarks/RESULTS.md, recurrent).
    ``split`` as in :func:`_scan`."""
    first, T = inputs[0], inputs[0].shape[0]
    in_place = first.shape[1:] == (dcarry[0].shape[0], width) and first.dtype == dcarry[0].dtype
    dcarry, (inputs, dys, mask) = _chunks(dcarry, split, 0), _chunks((inputs, dys, mask), split, 1)
    chunk_body = _chunked(body, split)
    if not in_place:
        d0, dxp = jax.lax.scan(lambda d, i: chunk_body(d, *i), dcarry, (inputs, dys, mask),
                               reverse=not reverse)
        return _unchunk(d0, split, 0), _unchunk(dxp, split, 1)

    def step(carry, inp):
        d, buf, t = carry
        k = (jax.lax.dynamic_index_in_dim(buf, t, keepdims=False),) + inp[0]
        d, dxp = chunk_body(d, k, *inp[1:])
        return (d, jax.lax.dynamic_update_index_in_dim(buf, dxp, t, 0),
                t + (1 if reverse else -1)), None

    t0 = jnp.asarray(0 if reverse else T - 1, jnp.int32)
    (d0, dxp, _), _ = jax.lax.scan(step, (dcarry, inputs[0], t0), (inputs[1:], dys, mask),
                                   length=T, reverse=not reverse)
    return _unchunk(d0, split, 0), _unchunk(dxp, split, 1)


def _gather(a, b):
    """``Σ_{t,b} a_{tb}ᵀ b_{tb}`` for ``a [T, B, H]``, ``b [T, B, G]`` → ``[H, G]``, written as
    one ``dot_general`` contracting the leading ``T·B`` axis of both (the fastest of the forms
    measured on XLA:CPU; benchmarks/RESULTS.md, recurrent)."""
    two = lambda u: u.reshape(-1, u.shape[-1])                   # (T·B, ·)
    return jax.lax.dot_general(two(b), two(a), (((0,), (0,)), ((), ()))).T


def _compiled(f, static):
    """``f`` compiled once per cell, shapes and options for eager calls; inside an outer trace
    ``f`` itself, traced inline: a nested ``jit`` made the jitted training step measurably
    slower on XLA:CPU (numbers in benchmarks/RESULTS.md, recurrent)."""
    jitted = jax.jit(f, static_argnums=static)

    def run(*args):
        traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args))
        return (f if traced else jitted)(*args)
    return run


# The scans the layers in recurrent.py and the functions below run: (final, hs), (final, hs, gates)
# and (grads, dxs, dcarry0).
run_apply = _compiled(_apply_scan, (0, 5, 6))
run_fwd = _compiled(_fwd_scan, (0, 5, 6))
run_bwd = _compiled(_bwd_scan, (0, 8, 9))


def prepare(name, cell, params, xs, lengths, carry, what="initial_carry"):
    """Check ``xs``, ``lengths`` and ``carry``; return ``(mask (T, B, 1) or None, carry0)``,
    ``carry0`` zeros when ``carry`` is ``None``."""
    check_sequence(name, xs, params["wi"].shape[0])
    B, T, _ = xs.shape
    H = params["wh"].shape[0]
    mask = check_lengths(name, lengths, B, T)
    c0 = zeros_carry(cell, B, H, xs.dtype) if carry is None else \
        check_carry(name, cell, carry, B, H, what)
    return mask, c0


def scan_rnn(cell: Cell, params, xs, carry=None, *, lengths=None, reverse=False):
    """Run ``cell`` over a batch of sequences (the plain step, as ``apply`` does).

    **Arguments:** ``xs: [batch, time, in]``; ``carry``: initial carry (``h`` or ``(h, c)``,
    each ``[batch, H]``; default zeros); ``lengths: int[batch]`` real steps per sequence;
    ``reverse``: scan from each sequence's end to its start.
    **Returns:** ``(ys [batch, time, H], final_carry)``; ``ys`` is zero at padded steps.

    >>> from fnn.layers import lstm_cell
    >>> xs = jnp.ones((2, 7, 3))                                     # [batch, time, in]
    >>> params = {"wi": jnp.full((3, 4 * 5), 0.1), "wh": jnp.full((5, 4 * 5), 0.1),
    ...           "b": jnp.zeros(4 * 5)}                             # 4 gates, H = 5
    >>> ys, (h, c) = scan_rnn(lstm_cell, params, xs)
    >>> ys.shape, h.shape, bool(jnp.allclose(ys[:, -1], h))
    ((2, 7, 5), (2, 5), True)
    """
    mask, c0 = prepare(f"scan_rnn({cell.name})", cell, params, xs, lengths, carry)
    final, hs = run_apply(cell, params, xs, c0, mask, reverse)
    return jnp.swapaxes(hs, 0, 1), from_tuple(cell, final)


def scan_rnn_backward(cell: Cell, params, xs, dys, dcarry=None, carry=None, *, lengths=None,
                      reverse=False):
    """Hand-derived VJP of :func:`scan_rnn` (backpropagation through time).

    ``dys: [batch, time, H]`` or ``None``; ``dcarry``: gradient of the final carry or ``None``.
    **Returns:** ``(dparams, dxs [batch, time, in], dcarry0)``.
    """
    name = f"scan_rnn_backward({cell.name})"
    mask, c0 = prepare(name, cell, params, xs, lengths, carry)
    B, T, _ = xs.shape
    H = c0[0].shape[1]
    d = zeros_carry(cell, B, H, xs.dtype) if dcarry is None else \
        check_carry(name, cell, dcarry, B, H, "dcarry")
    if dys is not None and tuple(dys.shape) != (B, T, H):
        raise ValueError(f"{name}: dys must have shape {(B, T, H)}, got {tuple(dys.shape)}")
    dys = None if dys is None else jnp.swapaxes(dys, 0, 1)
    _, _, emitted = run_fwd(cell, params, xs, c0, mask, reverse)
    grads, dxs, d0 = run_bwd(cell, params, xs, emitted, dys, d, c0, mask, reverse)
    return grads, dxs, from_tuple(cell, d0)
