"""Checkpoints of sharded train states, from one process or many, restored onto any mesh.

A checkpoint is a directory::

    ckpt/checkpoint.json                  the commit record (written last, atomically)
    ckpt/v-3f9c0a12/shards-00000.safetensors   process 0's pieces
    ckpt/v-3f9c0a12/shards-00001.safetensors   process 1's pieces ...

Each process writes, with :func:`fnn.checkpoint.save` (hand-written safetensors, SHA-256,
atomic), the shards it holds that no other device holds a copy of (``replica_id == 0``), and
their places in the global arrays (``[start, stop)`` per axis) in the file's metadata. After
a barrier, process 0 writes ``checkpoint.json`` — the format, the version directory, the
number of processes, every leaf's name, global shape and dtype — with the same
write-temp/fsync/rename, then removes older version directories. Until that rename the old
``checkpoint.json`` names the old, untouched version: a save killed at any point leaves the
last good checkpoint loadable.

:func:`restore` reads every shard file (untrusted input: each is checked by
:func:`fnn.checkpoint.load`, every piece's bounds, shape and dtype by this module, and the
pieces must cover each array exactly), assembles each array on the host and places it with
``jax.make_array_from_callback`` on the target shardings — any mesh, any number of processes
(every process reads the directory, so it must be on a file system all of them see).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checkpoint as _ckpt
from fnn.checkpoint import CheckpointError, CheckpointMismatchError, _format, _tree

__all__ = ["save", "restore", "CheckpointError", "CheckpointMismatchError"]

FORMAT = "fnn-sharded-checkpoint/1"
_RECORD = "checkpoint.json"
_VERSION = re.compile(r"^v-[0-9a-f]{8}$")
_MAX_RECORD = 64 * 2 ** 20


def _barrier(name):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _version() -> str:
    """A fresh version name, the same on every process (process 0's draw, broadcast)."""
    token = np.array(secrets.randbits(31), np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        token = multihost_utils.broadcast_one_to_all(token)
    return f"v-{int(token):08x}"


def _raw(leaf):
    return jax.random.key_data(leaf) if _tree.is_key(leaf) else leaf


def _pieces(leaf):
    """This process's unique shards of ``leaf``: ``[(bounds, numpy array)]``."""
    a = _raw(leaf)
    if not isinstance(a, jax.Array):
        a = jnp.asarray(a)
    out = []
    for s in a.addressable_shards:
        if s.replica_id == 0:
            bounds = [list(ix.indices(n)[:2]) for ix, n in zip(s.index, a.shape)]
            out.append((bounds, np.asarray(s.data)))
    return out


def save(path, tree) -> str:
    """Save ``tree`` (a pytree of possibly sharded ``jax.Array``s; typed PRNG keys allowed)
    to the directory ``path``; every process calls it with its view of the same global tree.
    Returns ``path``.

    >>> import jax.numpy as jnp
    >>> from fnn import sharding
    >>> mesh = sharding.make_mesh((jax.device_count(),), ("data",))
    >>> tree = sharding.shard_params({"w": jnp.ones((8, 2))}, mesh, sharding.fsdp(min_size=1))
    >>> sharding.checkpoint.save("ckpt", tree)                  # a directory
    'ckpt'
    """
    path = os.fspath(path)
    leaves, names = _tree.leaf_names(tree)
    version = _version()
    arrays, places = {}, []
    for i, leaf in enumerate(leaves):
        for bounds, arr in _pieces(leaf):
            arrays[f"a{len(places)}"] = arr
            places.append([i, bounds])
    folder = os.path.join(path, version)
    os.makedirs(folder, exist_ok=True)
    _ckpt.save(os.path.join(folder, f"shards-{jax.process_index():05d}.safetensors"), arrays,
               metadata={"pieces": json.dumps(places)})
    _barrier(f"fnn_ckpt_written_{version}")
    if jax.process_index() == 0:
        record = {"format": FORMAT, "version": version, "processes": jax.process_count(),
                  "leaves": [{"name": n, "shape": list(np.shape(_raw(a))),
                              "dtype": np.dtype(_raw(a).dtype).name}
                             for n, a in zip(names, leaves)]}
        _format.atomic_write(os.path.join(path, _RECORD), [json.dumps(record).encode()])
        for old in os.listdir(path):
            if _VERSION.match(old) and old != version:
                shutil.rmtree(os.path.join(path, old), ignore_errors=True)
    _barrier(f"fnn_ckpt_committed_{version}")
    return path


# --------------------------------------------------------------------------- restore

def _read_record(path):
    file = os.path.join(path, _RECORD)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no sharded checkpoint here (no {_RECORD})")
    if os.path.getsize(file) > _MAX_RECORD:
        raise CheckpointError(f"{file}: too large for a checkpoint record")
    try:
        with open(file, "rb") as f:
            rec = json.loads(f.read().decode("utf-8"))
        ok = (isinstance(rec, dict) and rec.get("format") == FORMAT
              and isinstance(rec.get("version"), str) and _VERSION.match(rec["version"])
              and isinstance(rec.get("processes"), int) and 0 < rec["processes"] < 2 ** 16
              and isinstance(rec.get("leaves"), list))
        if not ok:
            raise ValueError("not an fnn sharded checkpoint record")
        for e in rec["leaves"]:
            if not (isinstance(e, dict) and isinstance(e.get("name"), str)
                    and isinstance(e.get("shape"), list) and len(e["shape"]) <= 32
                    and all(type(d) is int and 0 <= d < 2 ** 40 for d in e["shape"])
                    and e.get("dtype") in _format.CODES):
                raise ValueError(f"bad leaf entry {_tree.short(e)}")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: corrupt checkpoint record: {str(e)[:200]}") from None
    return rec


def _check_like(path, rec, leaves, names):
    stored = {e["name"]: e for e in rec["leaves"]}
    problems = [f"missing from the checkpoint: {n!r}" for n in names if n not in stored]
    problems += [f"in the checkpoint but not in like: {n!r}" for n in stored if n not in names]
    for n, leaf in zip(names, leaves):
        if n in stored:
            shape, dtype = _tree.like_spec(leaf)
            e = stored[n]
            if tuple(e["shape"]) != shape or (dtype is not None and e["dtype"] != dtype):
                problems.append(f"{n!r}: {e['dtype']}{tuple(e['shape'])} in the checkpoint, "
                                f"{dtype}{shape} in like")
    if problems:
        raise CheckpointMismatchError(f"{path}: the checkpoint does not match like= "
                                      f"({len(problems)} differences):\n  "
                                      + "\n  ".join(problems))
    return [stored[n] for n in names]


def _assemble(path, rec, entries):
    """Global NumPy arrays from every process's shard file, each element covered once."""
    full = [np.zeros(e["shape"], e["dtype"]) for e in entries]
    seen = [np.zeros(e["shape"], np.int8) for e in entries]
    folder = os.path.join(path, rec["version"])
    for p in range(rec["processes"]):
        file = os.path.join(folder, f"shards-{p:05d}.safetensors")
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: shard file {file} is missing")
        arrays = _ckpt.load(file)
        try:
            places = json.loads(_ckpt.read_metadata(file).get("pieces", "null"))
            if not isinstance(places, list) or len(places) != len(arrays):
                raise ValueError("the piece list does not match the arrays")
            for k, place in enumerate(places):
                _put(full, seen, place, arrays.get(f"a{k}") if isinstance(arrays, dict) else None)
        except (ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{file}: corrupt shard file: {str(e)[:200]}") from None
    for e, s in zip(entries, seen):
        if s.size and not np.all(s == 1):
            raise CheckpointError(f"{path}: leaf {e['name']!r} is not covered exactly once by "
                                  f"the shard files")
    return full


def _put(full, seen, place, arr):
    i, bounds = place
    if type(i) is not int or not 0 <= i < len(full) or arr is None:
        raise ValueError(f"bad piece {_tree.short(place)}")
    shape = full[i].shape
    if not isinstance(bounds, list) or len(bounds) != len(shape) or not all(
            isinstance(b, list) and len(b) == 2 and all(type(v) is int for v in b)
            and 0 <= b[0] <= b[1] <= n for b, n in zip(bounds, shape)):
        raise ValueError(f"piece bounds {_tree.short(bounds)} outside shape {shape}")
    ix = tuple(slice(a, b) for a, b in bounds)
    if arr.shape != tuple(b - a for a, b in bounds) or arr.dtype != full[i].dtype:
        raise ValueError(f"piece {arr.dtype}{arr.shape} does not fit {full[i].dtype} {bounds}")
    full[i][ix] = arr
    seen[i][ix] += 1


def restore(path, like, shardings=None):
    """Read the checkpoint in directory ``path`` into ``like``'s structure, placed on
    ``shardings`` (a tree like ``like`` of ``jax.sharding.Sharding``s; default each ``like``
    leaf's own ``.sharding``). ``like``: arrays or ``jax.ShapeDtypeStruct``s. Names, shapes
    and dtypes must agree (:class:`CheckpointMismatchError` lists the differences); a
    malformed directory raises :class:`CheckpointError`. Bit-exact: the bytes saved are the
    bytes restored.

    >>> import jax.numpy as jnp
    >>> from fnn import sharding
    >>> mesh = sharding.make_mesh((jax.device_count(),), ("data",))
    >>> tree = sharding.shard_params({"w": jnp.arange(16.0).reshape(8, 2)}, mesh,
    ...                              sharding.fsdp(min_size=1))
    >>> path = sharding.checkpoint.save("ckpt", tree)
    >>> like = {"w": jax.ShapeDtypeStruct((8, 2), tree["w"].dtype)}  # shapes only
    >>> back = sharding.checkpoint.restore("ckpt", like, {"w": tree["w"].sharding})
    >>> bool((back["w"] == tree["w"]).all()), back["w"].sharding.spec
    (True, P('data',))
    """
    path = os.fspath(path)
    rec = _read_record(path)
    leaves, names = _tree.leaf_names(like)
    entries = _check_like(path, rec, leaves, names)
    shard = (jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
             if shardings is not None else [getattr(a, "sharding", None) for a in leaves])
    if len(shard) != len(leaves) or any(s is None for s in shard):
        raise ValueError(f"sharding.checkpoint.restore: need one sharding per leaf of like "
                         f"({len(leaves)}), got {len(shard)} (pass shardings=)")
    out = []
    for leaf, arr, s in zip(leaves, _assemble(path, rec, entries), shard):
        a = jax.make_array_from_callback(arr.shape, s, lambda ix, arr=arr: arr[ix])
        out.append(jax.random.wrap_key_data(a, impl=_tree.key_impl(leaf))
                   if _tree.is_key(leaf) else a)
    return jax.tree.unflatten(jax.tree.structure(like), out)
