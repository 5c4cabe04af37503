"""Batches on a mesh: split over the data axis, fed per process, shuffled within shards.

A batch ``[B, ...]`` is split along its first axis over the mesh axis ``"data"`` (each of the
``D`` devices along it holds ``B / D`` consecutive examples; the other mesh axes hold copies).
``B`` must be a multiple of ``D``: fnn does not pad silently.

Per-shard shuffle: a global permutation of a batch-sharded data set compiles into an
all-gather of the whole set every epoch. :func:`shard_shuffle` instead views the ``n``
examples as ``[D, n / D, ...]`` (device ``j`` already holds row ``j``), permutes within each
row, and cuts every row into local batches of ``B / D``; global batch ``i`` is the ``i``-th
local batch of every device side by side. Nothing crosses devices. On one device the same
function gives the same batches, so sharded and single-device runs can be compared step by
step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fnn.sharding.mesh import as_auto, axis_size, check_axes

__all__ = ["batch_sharding", "shard_batch", "process_local_batch", "shard_shuffle",
           "take_batch", "interleave_order", "shard_dataset"]


def batch_sharding(mesh, axis="data") -> NamedSharding:
    """The sharding of a batch: first axis split over ``axis``, the rest whole."""
    mesh = as_auto(mesh)
    check_axes(mesh, axis if isinstance(axis, tuple) else (axis,), "batch_sharding")
    return NamedSharding(mesh, P(axis))


def _check_divisible(tree, n, what, where):
    for a in jax.tree.leaves(tree):
        if not jnp.ndim(a) or jnp.shape(a)[0] % n:
            size = jnp.shape(a)[0] if jnp.ndim(a) else "of a scalar"
            raise ValueError(f"{where}: {what} size {size} is not divisible by the {n} "
                             f"devices of the data axis; use a batch size that is a multiple "
                             f"of {n} (fnn does not pad batches)")


def shard_batch(batch, mesh, axis="data"):
    """``batch`` (a pytree of ``[B, ...]`` arrays, all of this process) placed on ``mesh``
    split over ``axis``. Raises ``ValueError`` when ``B`` is not a multiple of the axis size.

    >>> from fnn.sharding import make_mesh
    >>> mesh = make_mesh((jax.device_count(),), ("data",))
    >>> x, y = shard_batch((jnp.ones((8, 4)), jnp.arange(8)), mesh)
    >>> x.sharding.spec
    P('data',)
    """
    sharding = batch_sharding(mesh, axis)
    _check_divisible(batch, axis_size(sharding.mesh, axis), "batch", "shard_batch")
    return jax.device_put(batch, sharding)


def process_local_batch(local_batch, mesh, axis="data"):
    """The global batch made from every process's ``local_batch`` (multi-process training):
    process ``p`` passes its own ``[B / P, ...]`` part and gets arrays of global shape
    ``[B, ...]`` (``jax.make_array_from_process_local_data``), split over ``axis``; no data
    crosses hosts. With one process this is :func:`shard_batch`."""
    sharding = batch_sharding(mesh, axis)
    local = len([d for d in sharding.mesh.devices.flat
                 if d.process_index == jax.process_index()])
    n_local = max(1, axis_size(sharding.mesh, axis) * local // sharding.mesh.size)
    _check_divisible(local_batch, n_local, "process-local batch", "process_local_batch")
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a),
                        local_batch)


def shard_shuffle(key, data, num_shards: int, batch_size: int):
    """Epoch batches permuted within shards: ``(head, rest)``.

    ``data``: a pytree of ``[n, ...]`` arrays, ``n`` a multiple of ``num_shards`` (``D``).
    ``head``: ``[D, full, batch_size / D, ...]`` with ``full = n // batch_size`` full batches
    (take batch ``i`` with :func:`take_batch`); ``rest``: the remaining ``n - full·B``
    examples as one ``[n - full·B, ...]`` batch (possibly empty), also drawn within shards.
    ``key=None`` keeps the order. Row ``j``'s permutation is ``permutation(fold_in(key, j))``.
    """
    leaves = jax.tree.leaves(data)
    n = leaves[0].shape[0]
    if n % num_shards or batch_size % num_shards:
        raise ValueError(f"shard_shuffle: {n} examples and batch size {batch_size} must both "
                         f"be multiples of the {num_shards} data shards")
    per, local = n // num_shards, batch_size // num_shards
    full = n // batch_size
    rows = jax.tree.map(lambda a: a.reshape((num_shards, per) + a.shape[1:]), data)
    if key is not None:
        keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_shards))
        order = jax.vmap(lambda k: jax.random.permutation(k, per))(keys)      # [D, per]
        rows = jax.tree.map(lambda a: jax.vmap(lambda r, o: r[o])(a, order), rows)
    head = jax.tree.map(                                                    # [D, full, B/D, ...]
        lambda a: a[:, :full * local].reshape((num_shards, full, local) + a.shape[2:]), rows)
    rest = jax.tree.map(lambda a: a[:, full * local:].reshape((-1,) + a.shape[2:]), rows)
    return head, rest


def take_batch(head, i):
    """Global batch ``i`` ``[B, ...]`` of a :func:`shard_shuffle` head ``[D, full, B/D, ...]``
    (a dynamic index on the unsplit axis, then a merge of the split one: no communication)."""
    return jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, 1, keepdims=False)
        .reshape((-1,) + a.shape[3:]), head)


def interleave_order(n: int, num_shards: int, batch_size: int) -> np.ndarray:
    """Row order that makes unshuffled sharded epochs read batches in sequence.

    ``data[order]`` split into ``num_shards`` (``D``) contiguous blocks puts in block ``j``
    the ``j``-th ``B / D`` rows of every batch ``i`` (rows ``i·B + j·B/D ...``), then its part
    of the last partial batch. :func:`shard_shuffle` with ``key=None`` then gives batch ``i`` =
    ``data[i·B:(i+1)·B]`` and ``rest = data[full·B:]``, exactly the batches of an unsharded
    epoch; with a key, each device shuffles only rows it holds.
    """
    if n % num_shards or batch_size % num_shards:
        raise ValueError(f"interleave_order: {n} examples and batch size {batch_size} must "
                         f"both be multiples of the {num_shards} data shards")
    full, local = n // batch_size, batch_size // num_shards
    r = (n - full * batch_size) // num_shards
    blocks = []
    for j in range(num_shards):
        head = (np.arange(full)[:, None] * batch_size + j * local + np.arange(local)[None, :])
        blocks += [head.ravel(), full * batch_size + j * r + np.arange(r)]
    return np.concatenate(blocks).astype(np.int64)


def shard_dataset(data, mesh, batch_size: int, axis="data"):
    """A whole training set (pytree of ``[n, ...]`` arrays, held by this process) placed for
    sharded epochs: rows reordered on the host by :func:`interleave_order` (once, before
    training), then split over ``axis``. ``n`` and ``batch_size`` must be multiples of the
    axis size (``ValueError`` otherwise)."""
    d = axis_size(batch_sharding(mesh, axis).mesh, axis)
    n = jnp.shape(jax.tree.leaves(data)[0])[0]
    order = interleave_order(n, d, batch_size)
    return shard_batch(jax.tree.map(lambda a: np.asarray(a)[order], data), mesh, axis)
