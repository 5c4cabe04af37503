"""Compile a train step (or a whole epoch) for a mesh: shardings in and out, state donated.

:func:`make_sharded_step` wraps any pure ``f(train_state, batch, *rest) -> (train_state,
*outputs)`` — ``fnn.train.make_step(..., jit=False)``'s step, or ``fit``'s epoch ``(ts, data,
limit) -> (ts, steps, bad, metrics)`` — in ``jax.jit`` with the train state's shardings in
and out, the batch (or data set) split over the data axis, every other input and output
replicated, and the train state's buffers donated. XLA's SPMD partitioner then inserts the
collectives the shardings imply: the gradients' all-reduce for data parallelism, the
parameters' all-gather and the gradients' reduce-scatter for FSDP, the activations'
all-reduce for tensor parallelism; the hand-derived backward gets them like autodiff does.
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from fnn.core import Summary
from fnn.sharding.data import batch_sharding
from fnn.sharding.mesh import as_auto
from fnn.sharding.rules import param_paths

__all__ = ["make_sharded_step", "make_epoch", "sharding_table"]


def make_sharded_step(step, mesh, train_state_sharding, batch_sharding_=None, *,
                      donate: bool = True):
    """``step`` jitted for ``mesh``.

    **Arguments:** ``step``: a pure ``(train_state, batch, *rest) -> (train_state, *outputs)``;
    ``train_state_sharding``: a tree of ``NamedSharding``s like the train state (from
    :func:`fnn.sharding.train_state_shardings`); ``batch_sharding_``: the batch's sharding (a
    sharding or a tree of them; default: split over ``"data"``). ``rest`` and ``outputs``
    (metrics, step counts) are replicated. ``donate``: the input train state's buffers are
    reused for the output (do not use the old state after the call — nor the arrays it was
    made from: ``jax.device_put`` and :func:`~fnn.sharding.shard_params` return the arrays
    given when they already sit where asked).

    **Returns:** the compiled function, same signature as ``step``.

    >>> import jax.numpy as jnp
    >>> from fnn import losses, optim, train
    >>> from fnn.layers import Dense
    >>> from fnn.sharding import fsdp, make_mesh, shard_batch, train_state_shardings
    >>> model, loss, opt = Dense(3), losses.softmax_cross_entropy_with_integer_labels, optim.sgd(0.1)
    >>> mesh = make_mesh((jax.device_count(),), ("data",))
    >>> ts = train.create_train_state(model, opt, jax.random.PRNGKey(0), (8, 4))
    >>> ts_sh = train_state_shardings(ts, mesh, fsdp())
    >>> run = make_sharded_step(train.make_step(model, loss, opt, jit=False), mesh, ts_sh)
    >>> batch = (jnp.ones((8, 4)), jnp.arange(8) % 3)             # 8: a multiple of the devices
    >>> ts, metrics = run(jax.device_put(ts, ts_sh), shard_batch(batch, mesh))
    >>> int(ts.step), metrics.loss.shape
    (1, ())
    """
    mesh = as_auto(mesh)
    data = batch_sharding(mesh) if batch_sharding_ is None else batch_sharding_
    rep = NamedSharding(mesh, P())

    def split(ts, batch, *rest):
        out = step(ts, batch, *rest)
        return out[0], tuple(out[1:])

    cache = {}

    def run(ts, batch, *rest):
        f = cache.get(len(rest))
        if f is None:
            f = cache[len(rest)] = jax.jit(
                split, in_shardings=(train_state_sharding, data) + (rep,) * len(rest),
                out_shardings=(train_state_sharding, rep),
                donate_argnums=(0,) if donate else ())
        new, outputs = f(ts, batch, *rest)
        return (new,) + outputs
    return run


def make_epoch(step, num_shards: int, batch_size: int, *, shuffle: bool = True):
    """A whole epoch as one pure function ``(train_state, data) -> (train_state, metrics)``
    (metrics stacked per step), batches drawn by :func:`fnn.sharding.shard_shuffle` with
    the train state's ``key`` (split once per epoch), the full batches in one ``lax.scan``.
    Wrap it in :func:`make_sharded_step` with the data set's sharding as the batch sharding.
    The last partial batch is dropped."""
    from fnn.sharding.data import shard_shuffle, take_batch

    def epoch(ts, data):
        key, pkey = jax.random.split(ts.key)
        head, _ = shard_shuffle(pkey if shuffle else None, data, num_shards, batch_size)
        full = jax.tree.leaves(head)[0].shape[1]

        def body(ts, i):
            return step(ts, take_batch(head, i))
        return jax.lax.scan(body, ts._replace(key=key), jax.numpy.arange(full))
    return epoch


def sharding_table(tree) -> Summary:
    """A table of each leaf of ``tree`` (sharded arrays): path, global shape, dtype,
    ``PartitionSpec``, per-device shape and bytes per device, and the totals; a ``str``
    (``print`` it), like :func:`fnn.summary`.

    >>> import jax.numpy as jnp
    >>> from fnn.sharding import make_mesh, shard_params
    >>> mesh = make_mesh((jax.device_count(),), ("data",))
    >>> params = shard_params({"w": jnp.ones((4, 3), "float32"), "b": jnp.zeros(3, "float32")},
    ...                       mesh)                                   # no rules: replicated
    >>> print(sharding_table(params))
    param  shape   dtype    spec  per device  bytes/device
    ------------------------------------------------------
    b      (3,)    float32  P()   (3,)                  12
    w      (4, 3)  float32  P()   (4, 3)                48
    ------------------------------------------------------
    mesh {'data': ...}   bytes per device 60
    """
    leaves = jax.tree.leaves(tree)
    rows, total = [], 0
    for path, a in zip(param_paths(tree), leaves):
        sh = getattr(a, "sharding", None)
        spec = str(sh.spec) if isinstance(sh, NamedSharding) else str(sh)
        local = sh.shard_shape(a.shape) if sh is not None else a.shape
        nbytes = a.dtype.itemsize
        for d in local:
            nbytes *= d
        total += nbytes
        rows.append((path, str(tuple(a.shape)), str(a.dtype), spec, str(tuple(local)),
                     f"{nbytes:,}"))
    head = ("param", "shape", "dtype", "spec", "per device", "bytes/device")
    cells = [head] + rows
    widths = [max(len(r[j]) for r in cells) for j in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if j == 5 else c.ljust(w)
                              for j, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(fmt(head))
    mesh = next((a.sharding.mesh for a in leaves
                 if isinstance(getattr(a, "sharding", None), NamedSharding)), None)
    where = f"mesh {dict(mesh.shape)}" if mesh is not None else "no mesh"
    return Summary("\n".join([fmt(head), rule] + [fmt(r) for r in rows] + [rule,
                   f"{where}   bytes per device {total:,}"]))
