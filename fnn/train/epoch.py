"""Whole epochs as one compiled call, chunks of streamed steps, and evaluation as one scan.

The loop carries the state and the *sums* of what the history reports (loss × examples, each
metric's sums, the gradient norm only when asked for): nothing is written per step, nothing
is recomputed after. It leaves at the first non-finite loss (the guard), keeping the state and sums from before
that step (an in-loop select), so the last good state comes back from the call itself and the
train state's buffers can be donated (:data:`DONATE`): the epoch updates them in place.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import tuning
from fnn.core import default_dtype
from fnn.optim.rates import rate_nodes
from fnn.train.cache import cached
from fnn.train.metrics import resolve_metrics
from fnn.sharding.data import shard_shuffle
from fnn.precision import current_scale
from fnn.train._batches import as_data, select
from fnn.train.predicting import with_precision
from fnn.train.progress import tick
from fnn.train.step import TrainState, all_finite, step_core

__all__ = ["evaluate"]


class Sums(NamedTuple):
    """Per-epoch sums: ``loss`` and ``grad_norm`` weighted by examples, ``examples``, and
    each metric's ``stats``."""

    loss: jax.Array
    grad_norm: jax.Array
    examples: jax.Array
    stats: tuple


def _add(acc: Sums, out) -> Sums:
    return Sums(acc.loss + out.loss * out.size, acc.grad_norm + out.grad_norm * out.size,
                acc.examples + out.size, jax.tree.map(jnp.add, acc.stats, out.stats))


def zero_sums(core, ts, batch) -> Sums:
    """Zeros shaped like the sums of ``core``'s outputs (traced shapes only)."""
    spec = jax.eval_shape(core, ts, batch)[1].stats
    z = jnp.zeros((), jnp.result_type(float))
    return Sums(z, z, z, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec))


def _loop(core, ts, stacked, limit, count, every=None):
    """Run ``core`` over the first ``min(limit, count)`` slices of ``stacked``, leaving after a
    non-finite one: ``(steps_run, ts, sums, bad)``; ``steps_run`` counts the bad step, ``ts``
    and ``sums`` are those from before it. ``every`` (a traced int, ``0``: never): report
    the steps done and the sums to the host (:func:`fnn.train.progress.tick`) every
    ``every`` steps, between segments of that many steps (an inner loop: no per-step test)."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)
    zero = zero_sums(core, ts, one)
    pack, unpack = _packer(zero)

    def body(c):
        i, ts, acc, _ = c
        new, out = core(ts, jax.tree.map(lambda a: a[i], stacked))
        ok = out.finite
        step = pack(_add(zero, out))            # 0 + x: this step's terms, exactly
        return i + 1, select(ok, new, ts), tuple(
            a + jnp.where(ok, v, jnp.zeros_like(v)) for a, v in zip(acc, step)), ~ok
    n = jnp.minimum(limit, count)
    init = (jnp.zeros((), jnp.int32), ts, pack(zero), jnp.zeros((), bool))
    if every is None:
        i, ts, acc, bad = jax.lax.while_loop(lambda c: (c[0] < n) & ~c[3], body, init)
        return i, ts, unpack(acc), bad

    def report(c):
        s = unpack(c[2])
        # one array to the host: JAX makes a jax.Array of each argument before the callback
        # runs, the costliest part of a report (benchmarks/RESULTS.md, sixth session)
        f = jnp.result_type(float)
        jax.debug.callback(_tick_packed, jnp.stack([c[0].astype(f), s.loss.astype(f),
                                                    s.examples.astype(f)]))

    def segment(c):
        end = jnp.minimum(c[0] + jnp.where(every > 0, every, n), n)
        c = jax.lax.while_loop(lambda c: (c[0] < end) & ~c[3], body, c)
        jax.lax.cond((c[0] < n) & ~c[3], report, lambda c: None, c)
        return c
    i, ts, acc, bad = jax.lax.while_loop(lambda c: (c[0] < n) & ~c[3], segment, init)
    return i, ts, unpack(acc), bad


def _tick_packed(v):
    """:func:`fnn.train.progress.tick` of ``[steps, loss_sum, examples]``."""
    steps, loss_sum, examples = np.asarray(v).tolist()
    tick(int(steps), loss_sum, examples)


def _packer(like):
    """``(pack, unpack)``: the leaves of a pytree shaped like ``like`` as one flat vector per
    dtype, and back. The loop carries the sums so: one add per dtype and step instead of one
    small kernel per scalar (each costs about a microsecond per step on XLA:CPU)."""
    leaves, tree = jax.tree.flatten(like)
    kinds = sorted({jnp.dtype(a.dtype).name for a in leaves})

    def pack(t):
        ls = jax.tree.leaves(t)
        return tuple(jnp.concatenate([jnp.ravel(a) for a, b in zip(ls, leaves)
                                      if jnp.dtype(b.dtype).name == k]) for k in kinds)

    def unpack(vs):
        at, out = dict.fromkeys(kinds, 0), []
        for b in leaves:
            k, n = jnp.dtype(b.dtype).name, int(np.size(b))
            out.append(vs[kinds.index(k)][at[k]:at[k] + n].reshape(np.shape(b)))
            at[k] += n
        return jax.tree.unflatten(tree, out)
    return pack, unpack


class Report(NamedTuple):
    """What the host reads after an epoch or chunk: ``steps`` run, ``bad`` (the last one was
    not finite), the ``sums``, and the ``learning_rate`` and loss scale in the optimizer state
    (NaN if none)."""

    steps: int
    bad: bool
    sums: Sums
    learning_rate: float
    loss_scale: float


DONATE = functools.partial(tuning.jit, donate_argnums=(0,))   # compiler options: fnn.tuning
"""The default ``jit`` of :func:`make_epoch_runner`: the train state's params, model state and
optimizer state (the first argument of the packed function) are donated."""
KEEP = tuning.jit
"""The same without donation: the state launched from stays whole (fit's replay copy)."""


class Runner:
    """A jitted ``(ts, data, limit) -> (ts, flat, next_limit)``: the report packed into one
    vector, so the host reads it in one transfer (``unpack(flat) -> Report``; each small array
    read on its own cost about a tenth of a small epoch). ``next_limit`` (on the device):
    ``limit``, or 0 after a non-finite step, the limit for an epoch launched from this one's
    state before its report is read (it then runs no step and hands the state on).

    ``ticks``: the runner reports its steps from inside (:func:`fnn.train.progress.tick`);
    its ``limit`` is then ``(limit, every)`` (a bare limit: no reports) and so is
    ``next_limit``.

    ``jit`` compiles ``packed(big, small, data, limit)`` with ``big = (params, state,
    opt_state)`` and ``small = (step, key)``: donating the first argument (:data:`DONATE`)
    reuses the train state's buffers and keeps the step and key of the state launched from
    readable (the host needs them after a non-finite step). ``donates``: whether ``jit``
    donates (else the state launched from stays whole: it is the replay's copy).
    ``strict()``: the runner that checks every step's gradient (itself, unless it was built
    ``strict=False``: see :func:`make_epoch_runner`), the one a replay runs."""

    def __init__(self, fn, jit=jax.jit, ticks=False):
        self.tree, self.specs, self.ticks = None, None, ticks
        self.strict = lambda: self
        self.donates = bool(getattr(jit, "keywords", {}).get("donate_argnums"))

        def packed(big, small, data, limit):
            ts, i, bad, acc = fn(join(big, small), data, limit)
            if ticks:                                   # (limit, every): every goes on
                limit, every = limit
            ls = current_scale(ts.opt_state)
            leaves, self.tree = jax.tree.flatten(Report(
                i, bad, acc, _rate(ts.opt_state), jnp.full((), jnp.nan) if ls is None else ls.scale))
            self.specs, at = [], 0                   # (start, stop, shape, dtype) per leaf
            for v in leaves:
                k = int(np.size(v))
                self.specs.append((at, at + k, np.shape(v), jnp.asarray(v).dtype))
                at += k
            f = jnp.result_type(float)
            nxt = jnp.where(bad, 0, limit).astype(jnp.int32)
            return (*split(ts), jnp.concatenate([jnp.ravel(v).astype(f) for v in leaves]),
                    (nxt, every) if ticks else nxt)
        self.jitted = jit(packed)

    def __call__(self, ts, data, limit):
        if self.ticks and not isinstance(limit, tuple):   # a replay: no reports
            limit = (limit, np.int32(0))
        big, small, flat, nxt = self.jitted(*split(ts), data, limit)
        return join(big, small), flat, nxt

    def unpack(self, flat) -> Report:
        flat = np.asarray(jax.device_get(flat))
        r = jax.tree.unflatten(self.tree, [flat[a:b].reshape(shape).astype(dtype)
                                           for a, b, shape, dtype in self.specs])
        return Report(int(r.steps), bool(r.bad), r.sums, float(r.learning_rate),
                      float(r.loss_scale))


def split(ts):
    """A train state as ``(big, small)``: ``(params, state, opt_state)`` and ``(step, key)``."""
    return (ts.params, ts.state, ts.opt_state), (ts.step, ts.key)


def join(big, small):
    """The inverse of :func:`split`."""
    return TrainState(*big, *small)


def _rate(opt_state):
    """The learning rate in ``opt_state`` (found at trace time), else NaN."""
    nodes = rate_nodes(opt_state)
    if not nodes:
        return jnp.full((), jnp.nan)
    node = nodes[0]
    return jnp.asarray(node.learning_rate if hasattr(node, "learning_rate")
                       else node.hyperparams["learning_rate"])


def _end_check(ts, bad):
    """A run built ``strict=False`` judged each step by its loss only: it is bad too when the
    state it ends with is not finite (one check per run, not one per step)."""
    return bad | ~all_finite((ts.params, ts.opt_state))


@cached
def make_chunk_runner(model, loss, update, grad, metrics, regularizer, grad_norm, augment,
                      jit=tuning.jit, strict=True):
    """A :class:`Runner` over a chunk of ``K`` stacked batches ``(K, batch, ...)``
    (streaming: one call per chunk). ``jit``: on a mesh, one with its shardings
    (:func:`fnn.train.distributed.chunk_jit`); the state is not donated (the streamed epoch
    keeps the state before each chunk for the replay). ``strict``: as
    :func:`make_epoch_runner`."""
    core = step_core(model, loss, update, grad, metrics, regularizer, grad_norm, augment,
                     strict)

    def chunk(ts, stacked, limit):
        count = jax.tree.leaves(stacked)[0].shape[0]
        i, ts, acc, bad = _loop(core, ts, stacked, limit, count)
        return ts, i, _end_check(ts, bad) if not strict else bad, acc
    run = Runner(chunk, jit)
    if not strict:
        run.strict = lambda: make_chunk_runner(model, loss, update, grad, metrics, regularizer,
                                               grad_norm, augment, jit, True)
    return run


@cached
def make_epoch_runner(model, loss, update, grad, metrics, regularizer, grad_norm, augment, n,
                      batch_size, drop_last, shuffle, shards=None, jit=DONATE, ticks=False,
                      strict=True):
    """One epoch as a :class:`Runner` ``(ts, data, limit) -> (ts, packed report)``, and the
    batch sizes. Shuffles (with a key split from ``ts.key``), runs the full batches, then the
    partial one (a real smaller batch, not padding) unless ``drop_last``.

    ``shards``: the data is split over that many devices (laid out by
    :func:`fnn.sharding.shard_dataset`), and the shuffle permutes within each device's shard
    (:func:`fnn.sharding.shard_shuffle`) so no batch gathers the data set; ``jit`` then
    compiles with the mesh's shardings (:func:`fnn.train.distributed.epoch_jit`). The train
    state given to the runner is donated (``jit``: :data:`DONATE`). ``ticks``: the epoch
    reports its steps from inside (see :class:`Runner`).

    ``strict=False`` (for a runner that does not donate, so the state it starts from is kept
    for a replay): each step is judged by its loss alone (and gradient norm, when computed),
    and the epoch is bad too when its final params or optimizer state are not finite; the
    host then replays it with ``runner.strict()``, which also checks each step's gradient
    (:func:`fnn.train.step.all_finite`) and so stops at the step where a non-finite value
    first appears. The per-step check costs a few reductions per step, a tenth of a small
    model's step on XLA:CPU; the end check one per epoch."""
    full, tail = divmod(n, batch_size)
    tail = 0 if drop_last else tail
    if full + (tail > 0) == 0:
        raise ValueError(f"fit: {n} examples make no batch of {batch_size} with drop_last=True")
    core = step_core(model, loss, update, grad, metrics, regularizer, grad_norm, augment,
                     strict)

    def epoch(ts, data, limit):
        limit, every = limit if ticks else (limit, None)
        key, pkey = jax.random.split(ts.key)
        if shards:
            head, rest = shard_shuffle(pkey if shuffle else None, data, shards, batch_size)
            # [D, full, B/D, ...] -> (full, B, ...): each device keeps its rows (no collective)
            head = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape((full, -1) + a.shape[3:]),
                                head)
        else:
            if shuffle:
                order = jax.random.permutation(pkey, n)
                data = jax.tree.map(lambda a: a[order], data)
            head = jax.tree.map(                         # (full, batch, ...)
                lambda a: a[:full * batch_size].reshape((full, batch_size) + a.shape[1:]), data)
            rest = jax.tree.map(lambda a: a[full * batch_size:], data)
        ts = ts._replace(key=key)
        if full:
            i, ts, acc, bad = _loop(core, ts, head, limit, full, every)
        else:
            i, bad, acc = jnp.zeros((), jnp.int32), jnp.zeros((), bool), zero_sums(core, ts, rest)
        if tail:
            go = (i == full) & (limit > full) & ~bad
            new, out = core(ts, rest)
            ok = go & out.finite
            ts, acc = select(ok, new, ts), select(ok, _add(acc, out), acc)
            i, bad = i + go, bad | (go & ~out.finite)
        return ts, i, _end_check(ts, bad) if not strict else bad, acc
    run = Runner(epoch, jit, ticks)
    if not strict:
        run.strict = lambda: make_epoch_runner(model, loss, update, grad, metrics, regularizer,
                                               grad_norm, augment, n, batch_size, drop_last,
                                               shuffle, shards, jit, False, True)[0]
    return run, (batch_size,) * full + ((tail,) if tail else ())


def batch_order(ts, n, shuffle):
    """The example order the in-memory epoch starting from ``ts`` uses (as
    :func:`make_epoch_runner`)."""
    if not shuffle:
        return jnp.arange(n)
    return jax.random.permutation(jax.random.split(ts.key)[1], n)


def _eval_sums(model, loss, metrics, params, state, batch, w):
    x, t, kw = batch
    pred, _ = model.apply(params, state, x, train=False, **kw)
    s = jnp.sum(w)
    return s * loss(pred, t, weights=w), tuple(m.stats(pred, t, w) for m in metrics), s


@cached
def make_eval(model, loss, metrics, n, batch_size):
    """Jitted ``(params, state, data) -> (mean loss, metric results)`` in eval mode: the last
    batch padded with copies of the last example at weight 0, so every batch has one shape
    and the mean counts each of the ``n`` real examples once."""
    nb = math.ceil(n / batch_size)

    def run(params, state, data):
        idx = jnp.minimum(jnp.arange(nb * batch_size), n - 1)
        w = (jnp.arange(nb * batch_size) < n).astype(default_dtype()).reshape(nb, batch_size)
        data = jax.tree.map(lambda a: a[idx].reshape((nb, batch_size) + a.shape[1:]), data)

        def body(total, batch):
            sums = _eval_sums(model, loss, metrics, params, state, *batch)
            return jax.tree.map(jnp.add, total, sums), None
        one = jax.tree.map(lambda a: a[0], (data, w))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            lambda b: _eval_sums(model, loss, metrics, params, state, *b), one))
        (tot, stats, _), _ = jax.lax.scan(body, zero, (data, w))
        return tot / n, tuple(m.result(s) for m, s in zip(metrics, stats))
    return jax.jit(run)


@cached
def make_eval_batch(model, loss, metrics):
    """Jitted ``(params, state, batch) -> (loss sum, metric stats, examples)`` for one
    streamed validation batch (summed by the caller)."""
    def run(params, state, batch):
        n = jax.tree.leaves(batch[0])[0].shape[0]
        return _eval_sums(model, loss, metrics, params, state, batch,
                          jnp.ones((n,), default_dtype()))
    return jax.jit(run)


def evaluate(model, loss, params, state, data, *, batch_size: int = 256,
             metrics="auto", precision=None) -> dict:
    """Mean loss and metrics of ``model`` on ``data = (x, target[, model_kwargs])`` in eval
    mode (``train=False``), in one compiled scan. ``loss`` must take ``weights=``.
    ``metrics``: as :func:`fnn.train.fit` (``"auto"``: accuracy for a classification loss).
    ``precision``: a :mod:`fnn.precision` policy, applied as ``fit(precision=...)`` does
    (``mixed_precision(model, precision)``), as :func:`fnn.train.predict` takes it.
    Returns ``{"loss": ..., name: ...}``.
    """
    model = with_precision(model, precision, "evaluate")
    data, n = as_data(data, "evaluate")
    if n == 0:
        raise ValueError("evaluate: data has 0 examples")
    ms = resolve_metrics(loss, metrics)
    lv, results = make_eval(model, loss, ms, n, min(batch_size, n))(params, state, data)
    return {"loss": float(lv), **{m.name: float(r) for m, r in zip(ms, results)}}
