"""``fit`` on a mesh: the data and train state laid out, the epoch compiled for the mesh (and
cached across calls), and what the host reads or writes when the mesh spans processes.

One process or several (``jax.distributed``): every process runs the same ``fit`` with the
same arguments. In-memory data: **every process holds the same full arrays** and places only
the rows of its own devices (``jax.make_array_from_callback``; nothing crosses hosts). The
train state is made the same way on every process (same key) and placed like the data. The
host reads replicated values (the epoch's packed report, validation results) from its own
shards, and a state spread over processes through ``process_allgather`` (a collective every
process joins). Progress lines, the resume file and the early-stopping message are written by
process 0 only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fnn import sharding
from fnn.sharding.data import batch_sharding, interleave_order, shard_shuffle, take_batch
from fnn.sharding.mesh import as_auto
from fnn.train.epoch import make_epoch, split

__all__ = ["on_mesh", "epoch_jit", "place", "to_host", "gathered", "is_writer"]


def is_writer() -> bool:
    """Whether this process writes logs and files (process 0; the only one without
    ``jax.distributed``)."""
    return jax.process_index() == 0


def _is_key(a):
    return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def place(tree, shardings):
    """``tree`` (the same values on every process) placed on ``shardings`` (a matching tree
    of ``Sharding``s): ``jax.device_put`` in one process; across processes each one builds
    only its own devices' pieces (``jax.make_array_from_callback``)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(a, s):
        if _is_key(a):
            data = place(jax.random.key_data(a), s)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        host = np.asarray(to_host(a))
        return jax.make_array_from_callback(host.shape, s, lambda ix: host[ix])
    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """``tree`` as NumPy arrays on this process: an array held whole here as is, a
    replicated one from a local copy, one spread over processes gathered
    (``multihost_utils.process_allgather``: every process must call this together)."""
    def one(a):
        if not isinstance(a, jax.Array):
            return np.asarray(a)
        if _is_key(a):
            return jax.random.wrap_key_data(jnp.asarray(to_host(jax.random.key_data(a))),
                                            impl=jax.random.key_impl(a))
        if a.is_fully_addressable:
            return np.asarray(a)
        if a.is_fully_replicated:
            return np.asarray(a.addressable_shards[0].data)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(one, tree)


def gathered(tree):
    """``tree`` whole on this process's first local device, gathered from the processes
    (:func:`to_host`; every process must call it together): what ``fit`` returns when its mesh
    spans processes, so that evaluation, sampling and saving after it run as in one process."""
    return jax.device_put(to_host(tree), jax.local_devices()[0])


@functools.lru_cache(maxsize=32)
def _jit(mesh, big, small, data):
    big_sh, small_sh, data_sh = (jax.tree.unflatten(t, leaves) for t, leaves in
                                 (big, small, data))
    rep = NamedSharding(mesh, P())
    return functools.partial(jax.jit, in_shardings=(big_sh, small_sh, data_sh, rep),
                             out_shardings=(big_sh, small_sh, rep, rep), donate_argnums=(0,))


def epoch_jit(mesh, ts_sharding, data_sharding):
    """The ``jit`` for :func:`fnn.train.epoch.make_epoch` on ``mesh``: the train state's
    shardings in and out (params, model and optimizer state donated), the data set split
    over ``"data"``, the report replicated. Equal meshes and shardings give the same object,
    so ``make_epoch``'s cache finds the compiled epoch of an earlier ``fit`` call."""
    big, small = split(ts_sharding)
    flat = lambda t: (jax.tree.structure(t), tuple(jax.tree.leaves(t)))
    return _jit(mesh, *((t, tuple(l)) for t, l in (flat(big), flat(small),
                                                    flat(data_sharding))))


def on_mesh(ctx, mesh, rules, ts, epoch_args):
    """Lay the data and the train state out on ``mesh`` and compile the epoch for it;
    returns the placed train state (``ctx`` gets ``data``, ``run``, ``sizes``, ``limit``,
    ``place`` and ``bad_inputs``)."""
    import warnings
    if ctx["stream"]:
        raise ValueError("fit: mesh= trains from arrays in memory; for streamed batches shard "
                         "each one yourself (fnn.sharding.make_sharded_step, shard_batch)")
    mesh = as_auto(mesh)
    sharding.check_axes(mesh, ("data",), "fit: mesh")
    shards, n, batch_size = mesh.shape["data"], epoch_args[8], epoch_args[9]
    if batch_size % shards:
        raise ValueError(f"fit: batch_size {batch_size} is not a multiple of the mesh's "
                         f"{shards} 'data' devices; each device takes an equal part of a batch")
    if n % shards:                       # the documented rule: the last n % shards are dropped
        warnings.warn(f"fit: {n} examples do not split over {shards} 'data' devices; training "
                      f"on the first {n - n % shards}")
        n -= n % shards
        epoch_args = epoch_args[:8] + (n,) + epoch_args[9:]
    order = interleave_order(n, shards, batch_size)
    data_sh = jax.tree.map(lambda _: batch_sharding(mesh), ctx["data"])
    ctx["data"] = place(jax.tree.map(lambda a: np.asarray(a)[:n][order], ctx["data"]), data_sh)
    ts_sh = sharding.train_state_shardings(ts, mesh, rules)
    ts = place(ts, ts_sh)
    ctx["run"], ctx["sizes"] = make_epoch(*epoch_args, shards,
                                          epoch_jit(mesh, ts_sh, data_sh))
    ctx["limit"] = place(np.int32(len(ctx["sizes"])), NamedSharding(mesh, P()))
    ctx["place"] = lambda t: place(t, ts_sh)
    ctx["bad_inputs"] = _bad_inputs(mesh, shards, batch_size, epoch_args[11], ctx["data"])
    return ts


def _bad_inputs(mesh, shards, batch_size, shuffle, data):
    """``bad_inputs(before, index)`` for a sharded epoch: batch ``index`` drawn as the epoch
    drew it (:func:`fnn.sharding.shard_shuffle`), checked on the devices."""
    rep = NamedSharding(mesh, P())

    @functools.partial(jax.jit, out_shardings=rep, static_argnums=2)
    def finite(key, data, index):
        head, rest = shard_shuffle(jax.random.split(key)[1] if shuffle else None, data,
                                   shards, batch_size)
        full = jax.tree.leaves(head)[0].shape[1]
        batch = take_batch(head, index) if index < full else rest
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(batch)
                                  if jnp.issubdtype(a.dtype, jnp.inexact)] or
                                 [jnp.array(True)]))

    def check(before, index):
        return bool(to_host(finite(before.key, data, index)))
    return check

