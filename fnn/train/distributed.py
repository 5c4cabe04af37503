"""``fit`` on a mesh: the data and train state laid out, the epoch compiled for the mesh (and
cached across calls), and what the host reads or writes when the mesh spans processes.

One process or several (``jax.distributed``): every process runs the same ``fit`` with the
same arguments. In-memory data: **every process holds the same full arrays** and places only
the rows of its own devices (``jax.make_array_from_callback``; nothing crosses hosts).
Streamed data: **each process feeds its own batches** (the same number, of the same shape),
checked on its host and placed on its devices; the global batch is theirs side by side
(``jax.make_array_from_process_local_data``). The
train state is made the same way on every process (same key) and placed like the data. The
host reads replicated values (the epoch's packed report, validation results) from its own
shards, and a state spread over processes through ``process_allgather`` (a collective every
process joins). Progress lines, the resume file and the early-stopping message are written by
process 0 only.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fnn import sharding
from fnn.sharding.data import batch_sharding, interleave_order, shard_shuffle, take_batch
from fnn.train.epoch import make_chunk_runner, make_epoch_runner, split

__all__ = ["OnMesh", "on_mesh", "memory_on_mesh", "stream_on_mesh", "epoch_jit", "chunk_jit",
           "place", "to_host", "gathered", "is_writer"]


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
def _jit(mesh, big, small, data, donate):
    big_sh, small_sh, data_sh = (jax.tree.unflatten(t, leaves) for t, leaves in
                                 (big, small, data))
    rep = NamedSharding(mesh, P())
    return functools.partial(jax.jit, in_shardings=(big_sh, small_sh, data_sh, rep),
                             out_shardings=(big_sh, small_sh, rep, rep),
                             donate_argnums=(0,) if donate else ())


def _runner_jit(mesh, ts_sharding, data_sharding, donate):
    big, small = split(ts_sharding)
    flat = lambda t: (jax.tree.structure(t), tuple(jax.tree.leaves(t)))
    return _jit(mesh, *((t, tuple(l)) for t, l in (flat(big), flat(small),
                                                    flat(data_sharding))), donate)


def epoch_jit(mesh, ts_sharding, data_sharding, donate=True):
    """The ``jit`` for :func:`fnn.train.epoch.make_epoch_runner` on ``mesh``: the train
    state's shardings in and out (params, model and optimizer state donated unless
    ``donate=False``), the data set split over ``"data"``, the report replicated. Equal
    meshes and shardings give the same object, so the runner's cache finds the compiled
    epoch of an earlier ``fit`` call."""
    return _runner_jit(mesh, ts_sharding, data_sharding, donate)


def chunk_jit(mesh, ts_sharding, chunk_sharding):
    """The ``jit`` for :func:`fnn.train.epoch.make_chunk_runner` on ``mesh``: as
    :func:`epoch_jit`, with each stacked chunk ``(K, batch, ...)`` split over ``"data"`` on
    its batch axis and nothing donated."""
    return _runner_jit(mesh, ts_sharding, chunk_sharding, False)


class OnMesh(NamedTuple):
    """What ``fit`` needs of a :class:`fnn.sharding.Distribution`: the ``mesh``, the train
    state's shardings ``ts_sharding`` and the number of ``shards`` along ``"data"``."""

    mesh: object
    ts_sharding: object
    shards: int

    def place_state(self, ts):
        """``ts`` laid out by ``ts_sharding``."""
        return place(ts, self.ts_sharding)

    def scalar(self, value):
        """An int32 scalar replicated on the mesh (a jitted input across processes must be a
        global array)."""
        return place(np.int32(value), NamedSharding(self.mesh, P()))


def on_mesh(distribution, ts) -> OnMesh:
    """The train state's layout for ``distribution`` (:class:`fnn.sharding.Distribution`)."""
    mesh = distribution.mesh
    return OnMesh(mesh, sharding.train_state_shardings(ts, mesh, distribution.params),
                  distribution.data_shards)


class PlacedLimit:
    """A runner whose ``limit`` argument is placed on the mesh first (several processes: a
    host scalar is not a valid input of a computation spanning them)."""

    def __init__(self, runner, on: OnMesh):
        self.runner, self.on, self.unpack = runner, on, runner.unpack
        self.donates, self.ticks = runner.donates, runner.ticks

    def __call__(self, ts, data, limit):
        if not isinstance(limit, jax.Array):
            limit = self.on.scalar(limit)
        return self.runner(ts, data, limit)


def _multi(runner, on):
    return PlacedLimit(runner, on) if jax.process_count() > 1 else runner


def memory_on_mesh(on: OnMesh, data, parts, batch_size, drop_last, shuffle, donate=True):
    """The in-memory epoch on the mesh: ``(runner, sizes, placed data, limit, bad_inputs)``.
    ``data``: the whole set, the same on every process; ``parts``: the step's
    ``(model, loss, update, grad, metrics, regularizer, grad_norm, augment)``; ``donate``:
    the runner donates the train state (see :func:`epoch_jit`)."""
    shards, mesh = on.shards, on.mesh
    n = jax.tree.leaves(data)[0].shape[0]
    if batch_size % shards:
        raise ValueError(f"fit: batch_size {batch_size} is not a multiple of the mesh's "
                         f"{shards} 'data' devices; each device takes an equal part of a batch")
    if n % shards:                       # the documented rule: the last n % shards are dropped
        warnings.warn(f"fit: {n} examples do not split over {shards} 'data' devices; training "
                      f"on the first {n - n % shards}")
        n -= n % shards
    order = interleave_order(n, shards, batch_size)
    data_sh = jax.tree.map(lambda _: batch_sharding(mesh), data)
    data = place(jax.tree.map(lambda a: np.asarray(a)[:n][order], data), data_sh)
    run, sizes = make_epoch_runner(*parts, n, batch_size, drop_last, shuffle, shards,
                                   epoch_jit(mesh, on.ts_sharding, data_sh, donate))
    return (_multi(run, on), sizes, data, on.scalar(len(sizes)),
            _bad_inputs(mesh, shards, batch_size, shuffle, data))


def stream_on_mesh(on: OnMesh, first, parts):
    """The streamed chunk runner on the mesh and ``put(stacked)``, which places this
    process's chunk ``(K, local batch, ...)`` split over its ``"data"`` devices (the global
    batch is every process's batches side by side). ``first``: a host batch, for the tree."""
    mesh = on.mesh
    sh = NamedSharding(mesh, P(None, "data"))
    chunk_sh = jax.tree.map(lambda _: sh, first)
    run = make_chunk_runner(*parts, chunk_jit(mesh, on.ts_sharding, chunk_sh))
    local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    per_process = max(1, on.shards * local // mesh.size)

    def put(stacked):
        for a in jax.tree.leaves(stacked):
            if a.ndim < 2 or a.shape[1] % per_process:
                raise ValueError(
                    f"fit: a streamed batch of {a.shape[1] if a.ndim > 1 else 'a scalar'} "
                    f"examples does not split over this process's {per_process} 'data' "
                    f"devices; each device takes an equal part of a batch (fnn does not pad)")
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sh, a), stacked)

    def put_batch(batch):                 # one validation batch (batch, ...)
        return jax.tree.map(lambda a: a[0], put(jax.tree.map(lambda a: np.asarray(a)[None],
                                                              batch)))
    return _multi(run, on), put, put_batch


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

