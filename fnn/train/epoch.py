"""Whole epochs as one compiled call, and evaluation as one compiled scan."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fnn.core import default_dtype
from fnn.train.metrics import _accuracy_fn
from fnn.train.step import _as_data, _step_core, _where

def _cached(build):
    """Memoise ``build`` on its arguments, so a second ``fit``/``evaluate`` with the same model,
    loss and optimizer objects reuses the compiled function (unhashable ones build afresh)."""
    cache = functools.lru_cache(maxsize=32)(build)

    @functools.wraps(build)
    def get(*args):
        try:
            hash(args)
        except TypeError:
            return build(*args)
        return cache(*args)
    return get


def _put(ms, i, m):
    """Write step ``i``'s metrics into the per-step buffers."""
    return jax.tree.map(lambda buf, v: buf.at[i].set(v), ms, m)


@_cached
def _make_epoch(model, loss, optimizer, grad, accuracy, regularizer, grad_norm, n, batch_size,
                drop_last, shuffle):
    """One jitted epoch ``(ts, data, limit) -> (ts, steps_run, bad, per-step StepMetrics)``.

    Shuffles, then runs the full batches in a ``lax.while_loop`` that leaves at the first
    non-finite step or after ``limit`` updates, then the partial batch. ``bad``: the last step
    run was non-finite; its update went in, so the last good state is a replay of the same
    call with ``limit = steps_run - 1`` (same program, same inputs: the same state, bit for
    bit). The common path thus pays nothing for the guard.
    """
    full, tail = divmod(n, batch_size)
    tail = 0 if drop_last else tail
    if full + (tail > 0) == 0:
        raise ValueError(f"fit: {n} examples make no batch of {batch_size} with drop_last=True")
    core = _step_core(model, loss, optimizer, grad, accuracy, regularizer, grad_norm)

    def epoch(ts, data, limit):
        key, pkey = jax.random.split(ts.key)
        if shuffle:
            order = jax.random.permutation(pkey, n)
            data = jax.tree.map(lambda a: a[order], data)
        head = jax.tree.map(                             # (full, batch, ...)
            lambda a: a[:full * batch_size].reshape((full, batch_size) + a.shape[1:]), data)
        rest = jax.tree.map(lambda a: a[full * batch_size:], data)
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), head)
        spec = jax.eval_shape(core, ts, one if full else rest)[1]
        ms = jax.tree.map(lambda s: jnp.zeros((full + (tail > 0),) + s.shape, s.dtype), spec)
        i, ts, bad = jnp.zeros((), jnp.int32), ts._replace(key=key), jnp.zeros((), bool)

        def body(c):
            i, ts, ms, _ = c
            new, m = core(ts, jax.tree.map(lambda a: a[i], head))
            return i + 1, new, _put(ms, i, m), ~m.finite
        if full:
            i, ts, ms, bad = jax.lax.while_loop(
                lambda c: (c[0] < jnp.minimum(limit, full)) & ~c[3], body, (i, ts, ms, bad))
        if tail:
            go = (i == full) & (limit > full) & ~bad
            new, m = core(ts, rest)
            ts, ms = _where(go, new, ts), _put(ms, full, m)
            i, bad = i + go, bad | (go & ~m.finite)
        return ts, i, bad, ms
    return jax.jit(epoch), (batch_size,) * full + ((tail,) if tail else ())


@_cached
def _make_eval(model, loss, accuracy, n, batch_size):
    """Jitted ``(params, state, data) -> (mean loss, mean accuracy)`` in eval mode: the last
    batch padded with copies of the last example at weight 0, so every batch has one shape
    and the mean counts each of the ``n`` real examples once."""
    nb = math.ceil(n / batch_size)

    def run(params, state, data):
        idx = jnp.minimum(jnp.arange(nb * batch_size), n - 1)
        w = (jnp.arange(nb * batch_size) < n).astype(default_dtype()).reshape(nb, batch_size)
        data = jax.tree.map(lambda a: a[idx].reshape((nb, batch_size) + a.shape[1:]), data)

        def body(total, batch):
            (x, t, kw), wb = batch
            pred, _ = model.apply(params, state, x, train=False, **kw)
            s = jnp.sum(wb)
            c = jnp.sum(accuracy(pred, t) * wb) if accuracy else jnp.zeros(())
            return (total[0] + loss(pred, t, weights=wb) * s, total[1] + c), None
        (tot, cor), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (data, w))
        return tot / n, (cor / n if accuracy else jnp.full((), jnp.nan))
    return jax.jit(run)


def evaluate(model, loss, params, state, data, *, batch_size: int = 256, accuracy="auto"
             ) -> dict:
    """Mean loss (and accuracy) of ``model`` on ``data = (x, target[, model_kwargs])`` in eval
    mode (``train=False``), in one compiled scan. ``loss`` must take ``weights=``."""
    data, n = _as_data(data, "evaluate")
    acc = _accuracy_fn(loss, accuracy)
    lv, av = _make_eval(model, loss, acc, n, min(batch_size, n))(params, state, data)
    return {"loss": float(lv), **({"accuracy": float(av)} if acc else {})}

