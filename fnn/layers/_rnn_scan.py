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


def _scan(cell, step, params, xs, carry0, mask, reverse, split=1, in_place=False):
    """Scan ``step(params, carry, xp_t) -> (carry, out)`` over time, ``xp_t = x_t wi + b``;
    padding keeps the carry. The bias is added inside the step, where it fuses with the
    recurrent term, rather than over the whole projection (measured in
    benchmarks/RESULTS.md, recurrent). ``split``: the batch as that many independent chains
    (:func:`_cut`), each with its own projection, carry and outputs, stepped side by side in
    one scan. Returns ``(finals, ys)``, one entry per chain. With ``in_place`` (the cell's
    ``fwd_step`` only, where ``Cell.in_place`` says so) the step's first output is written over
    ``xp_t`` (:func:`_in_place`)."""
    b = bias(params[cell.bias], 2)

    def chain_step(carry, xp_t, m_t):
        new, out = step(params, carry, xp_t + b)
        if m_t is not None:
            new = tuple(jnp.where(m_t, n, c) for n, c in zip(new, carry))
        return new, out

    def body(carries, xps, ms):
        return _per_chain(chain_step, carries, xps, ms)
    xps, ms = tuple(_project(params, x) for x in _cut(xs, split, 0)), _cut(mask, split, 1)
    carries = _cut(carry0, split, 0)
    if in_place:
        return _in_place(body, carries, xps, (ms,), reverse)
    return jax.lax.scan(lambda c, i: body(c, *i), carries, (xps, ms), reverse=reverse)


def _in_place(body, carry, bufs, xs, reverse):
    """``lax.scan`` over time of ``body(carry, bufs_t, xs_t) -> (carry, outs)``, ``bufs`` and
    ``outs`` one entry per chain: step ``t`` reads each chain's buffer ``[T, b, W]`` at ``t``
    and writes the chain's first output over it. The scan carries the buffers instead of
    stacking that output into a fresh zero-filled one (a fill and a copy of ``[T, b, W]`` per
    call), and each write goes to memory the step has just read (benchmarks/RESULTS.md,
    recurrent). ``reverse``: from ``t = T − 1`` down. Returns ``(carry, ys)``, each chain's
    ``ys`` being its buffer, then its other outputs stacked."""
    T = bufs[0].shape[0]

    def step(c, x_t):
        inner, bs, t = c
        inner, outs = body(inner, tuple(jax.lax.dynamic_index_in_dim(b, t, keepdims=False)
                                        for b in bs), *x_t)
        bs = tuple(jax.lax.dynamic_update_index_in_dim(b, o[0], t, 0) for b, o in zip(bs, outs))
        return (inner, bs, t + (-1 if reverse else 1)), tuple(tuple(o[1:]) for o in outs)

    t0 = jnp.asarray(T - 1 if reverse else 0, jnp.int32)
    (carry, bufs, _), rest = jax.lax.scan(step, (carry, bufs, t0), xs, length=T, reverse=reverse)
    return carry, tuple((b,) + r for b, r in zip(bufs, rest))


def _per_chain(f, *args):
    """``f(*chain_args) -> (carry, out)`` for each chain (``args``: one tuple per argument, an
    entry per chain), as ``(carries, outs)``."""
    steps = [f(*a) for a in zip(*args)]
    return tuple(s[0] for s in steps), tuple(s[1] for s in steps)


def _cut(tree, k, axis):
    """``tree`` as ``k`` chains: a tuple of ``k`` trees, each leaf's batch axis ``axis`` cut into
    ``k`` equal consecutive parts (``k = 1``: ``(tree,)``). The chains share no array inside
    the scans, so XLA:CPU's thunk executor runs each chain's matmul and elementwise kernels on
    its own thread, where one chain leaves a core waiting on the step's elementwise work (and
    chains stacked into one array serialise at each stack)."""
    if k == 1:
        return (tree,)

    def part(a, j):
        if a.shape[axis] % k:
            raise ValueError(f"a batch of {a.shape[axis]} does not cut into {k} equal chains")
        n = a.shape[axis] // k
        return jax.lax.slice_in_dim(a, j * n, (j + 1) * n, axis=axis)
    return tuple(jax.tree.map(lambda a, j=j: part(a, j), tree) for j in range(k))


def _join(chains, axis):
    """The inverse of :func:`_cut`: the chains' leaves side by side along ``axis``."""
    if len(chains) == 1:
        return chains[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=axis), *chains)


def _masked(hs, mask):
    return hs if mask is None else jnp.where(mask, hs, 0)


def _apply_scan(cell, params, xs, carry0, mask, reverse, sequences=True):
    """The plain forward: ``(final_carry, hs (T, B, H))``, ``hs`` zero at padding (``None``
    without ``sequences``: the scan then emits nothing, as a plain-JAX loop would)."""
    step = cell.step if sequences else lambda p, c, xp: (cell.step(p, c, xp)[0], None)
    (final,), (hs,) = _scan(cell, step, params, xs, carry0, mask, reverse)
    return final, (_masked(hs, mask) if sequences else None)


def _fwd_scan(cell, params, xs, carry0, mask, reverse, split=1):
    """The hand path's forward: ``(final_carry, hs, emitted)``, ``emitted`` being, per batch
    chain, every step's emitted values ``[T, b, ...]`` (the residuals); ``split``: the number
    of chains (the loop form, :mod:`fnn.layers._rnn_tuning`)."""
    finals, emitted = _scan(cell, cell.fwd_step, cell.fast(params), xs, carry0, mask, reverse,
                            split, cell.in_place)
    hs = _join(tuple(cell.output(e) for e in emitted), 1)
    return _join(finals, 0), _masked(hs, mask), emitted


def _bwd_scan(cell, params, xs, emitted, dys, dcarry, carry0, mask, reverse):
    """Hand BPTT from the residuals (``emitted`` per chain, as :func:`_fwd_scan` returns them;
    the chains run side by side in one reverse scan, and the weight gradients add theirs).
    ``dys``: ``(T, B, H)`` or ``None``; ``dcarry``: gradient of the final carry (tuple).
    Returns ``(dparams, dxs (B, T, F), dcarry0)``."""
    n = len(emitted)
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

    masks, h0s = _cut(mask, n, 1), _cut(carry0[0], n, 0)
    prevs = tuple(previous(cell.output(e), h0, m, reverse)      # h_{t-1} of each step
                  for e, h0, m in zip(emitted, h0s, masks))
    inputs = tuple(cell.back_inputs(e, p) for e, p in zip(emitted, prevs))  # in bulk, (T, b, ...)
    d0, dxps = _reverse_scan(body, _cut(dcarry, n, 0), inputs, _cut(dys, n, 1), masks, reverse,
                             params["wi"].shape[1])
    grads, dxs = None, []
    for e, x, prev, dxp in zip(emitted, _cut(xs, n, 0), prevs, dxps):
        dgh = dxp if cell.rec_grad is None else cell.rec_grad(e, dxp)   # (T, b, G·H)
        g = {"wi": _gather(jnp.swapaxes(x, 0, 1), dxp), "wh": _gather(prev, dgh)}
        if cell.rec_bias:
            g[cell.rec_bias] = jnp.sum(dgh, axis=(0, 1))
        g[cell.bias] = jnp.sum(dxp, axis=(0, 1))
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        dxs.append(jnp.swapaxes(jnp.einsum("tbg,fg->tbf", dxp, params["wi"]), 0, 1))
    return grads, _join(tuple(dxs), 0), _join(d0, 0)


def _reverse_scan(body, dcarry, inputs, dys, mask, reverse, width):
    """One ``lax.scan`` against the forward's direction of ``body(d, inputs_t, dy_t, m_t) ->
    (d, dxp_t)`` for every chain (``dcarry``, ``inputs``, ``dys``, ``mask``: one entry per
    chain); returns per chain ``(d0, dxp [T, b, G·H])``. When ``inputs[0]`` has ``dxp``'s shape
    (the LSTM's gate derivative factors, the Elman cell's derivatives), each step writes
    ``dxp_t`` over the slice it reads (:func:`_in_place`)."""
    h = dcarry[0][0]                                             # the first chain's dh
    if inputs[0][0].shape[1:] != (h.shape[0], width) or inputs[0][0].dtype != h.dtype:
        def each(d, i):
            return _per_chain(lambda dj, ij: body(dj, *ij), d, i)
        return jax.lax.scan(each, dcarry, tuple(zip(inputs, dys, mask)), reverse=not reverse)

    def chains(d, firsts, rest):
        def one(dj, k, r):
            dj, dxp = body(dj, (k,) + r[0], *r[1:])
            return dj, (dxp,)
        return _per_chain(one, d, firsts, rest)
    rest = tuple((i[1:], dy, m) for i, dy, m in zip(inputs, dys, mask))
    d0, ys = _in_place(chains, dcarry, tuple(i[0] for i in inputs), (rest,), not reverse)
    return d0, tuple(y[0] for y in ys)


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
run_bwd = _compiled(_bwd_scan, (0, 8))


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
