"""Checkpoints: any pytree of arrays in one safetensors file, written atomically, never pickled.

The file is the `safetensors <https://github.com/huggingface/safetensors>`_ format, written by
hand here (no extra dependency): an 8-byte little-endian header length ``N``; ``N`` bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces to a multiple of 8); then the raw little-endian bytes of every array,
back to back. Array names are the leaves' key paths joined by ``/`` (``params/0/w``,
``opt_state/0/mu/1/b``); the metadata holds the tree structure (dicts, lists, tuples,
NamedTuples, ``None``), the format version and a SHA-256 of the data, so any safetensors
reader can open the file and :func:`load` can rebuild the tree and detect corruption.

>>> from fnn import checkpoint
>>> tree = {"params": {"w": jnp.ones((2, 3))}, "step": jnp.array(7)}
>>> checkpoint.save("ckpt.safetensors", tree)
'ckpt.safetensors'
>>> back = checkpoint.load("ckpt.safetensors", like=tree)
>>> back["params"]["w"].shape, int(back["step"])
((2, 3), 7)

:func:`save` writes a temporary file in the same directory, ``fsync``s it, renames it over
``path`` (atomic on POSIX) and ``fsync``s the directory: a crash leaves either the old
checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnn.checkpoint import _format, _tree
from fnn.checkpoint._format import FORMAT, CheckpointError, CheckpointMismatchError  # noqa: F401

__all__ = ["save", "load", "read_metadata", "CheckpointError", "CheckpointMismatchError"]

PyTree = Any


def save(path, tree: PyTree, *, metadata: dict | None = None) -> str:
    """Write ``tree`` (any pytree of arrays and Python scalars) to ``path`` atomically.

    ``metadata``: extra ``{str: str}`` entries for the header (keys starting ``fnn.`` are
    reserved). Returns ``path``. Raises ``TypeError`` for a leaf safetensors cannot hold
    (complex, object) before touching the disk.
    """
    path = os.fspath(path)
    leaves, names = _tree.leaf_names(tree)
    arrays = [_format.to_numpy(a, n) for a, n in zip(leaves, names)]
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if any(k.startswith("fnn.") for k in meta):
        raise ValueError("checkpoint.save: metadata keys starting with 'fnn.' are reserved")
    meta["fnn.tree"] = json.dumps(_tree.describe(tree, list(names)))
    _format.write(path, names, arrays, meta)
    return path


def read_metadata(path) -> dict:
    """The ``__metadata__`` of a checkpoint (the ``fnn.*`` entries and the user's)."""
    return dict(_format.read(os.fspath(path))[1])


def load(path, like: PyTree = None) -> PyTree:
    """Read a checkpoint written by :func:`save` (or any safetensors file).

    With ``like`` (a tree of arrays, ``jax.ShapeDtypeStruct``s or Python scalars), the result
    has ``like``'s structure, and every name, shape and dtype must agree: otherwise
    :class:`CheckpointMismatchError` lists every difference; leaves come back as ``like``'s
    (JAX arrays, NumPy arrays, Python scalars, typed PRNG keys). Without ``like`` the tree is
    rebuilt from the metadata with NumPy leaves of the stored dtypes (NamedTuples as
    namedtuples of the same name and fields; a plain safetensors file as a flat dict).

    The file is untrusted input: anything malformed (header, offsets, shapes, dtypes,
    metadata, tree description) raises :class:`CheckpointError` naming the file and the
    problem, and nothing in the file selects a type or function beyond fnn's fixed tables.
    """
    path = os.fspath(path)
    header, meta, data, structure = _format.read(path)
    if like is None:
        arrays = {name: _format.array(e, data) for name, e in header.items()}
        if structure is None:           # a plain safetensors file: a flat dict
            return arrays
        try:
            return _tree.rebuild(structure, arrays)
        except _tree.TreeError as e:
            raise CheckpointError(f"{path}: {e}") from None
    leaves, names = _tree.leaf_names(like)
    _check_like(path, header, leaves, names)
    out = [_as_like(_format.array(header[n], data), leaf) for n, leaf in zip(names, leaves)]
    return jax.tree.unflatten(jax.tree.structure(like), out)


def _check_like(path, header, leaves, names):
    problems = [f"missing from the file: {n!r}" for n in names if n not in header]
    problems += [f"in the file but not in like: {n!r}" for n in header if n not in names]
    for n, leaf in zip(names, leaves):
        if n not in header:
            continue
        shape, dtype = _tree.like_spec(leaf)
        e = header[n]
        if shape is not None and tuple(e["shape"]) != shape:
            problems.append(f"{n!r}: shape {tuple(e['shape'])} in the file, {shape} in like")
        if type(leaf) is int and e["dtype"] not in _tree.INT_CODES:   # int(nan) would fail
            problems.append(f"{n!r}: a Python int in like, {e['dtype']} in the file")
        stored = _format.DTYPES[e["dtype"]]
        if dtype is not None and stored != dtype:
            problems.append(f"{n!r}: dtype {stored} in the file, {dtype} in like")
    if problems:
        raise CheckpointMismatchError(f"{path}: the checkpoint does not match like= "
                                      f"({len(problems)} differences):\n  "
                                      + "\n  ".join(problems))


def _as_like(arr, leaf):
    if _tree.is_key(leaf):
        return jax.random.wrap_key_data(jnp.asarray(arr), impl=_tree.key_impl(leaf))
    if isinstance(leaf, (bool, int, float)):
        return type(leaf)(arr)
    if isinstance(leaf, np.ndarray):
        return arr
    return jnp.asarray(arr)
