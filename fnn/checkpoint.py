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

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnn import _checkpoint_tree as _tree

__all__ = ["save", "load", "read_metadata", "CheckpointError", "CheckpointMismatchError"]

PyTree = Any
FORMAT = "fnn-checkpoint/1"
_MAX_HEADER = 100 * 2 ** 20
_MAX_RANK = 32
_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
           "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "I32": "int32",
           "F32": "float32", "U64": "uint64", "I64": "int64", "F64": "float64"}
_CODES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not a checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose arrays do not match the tree given as ``like``."""


# --------------------------------------------------------------------------- names and structure

def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _names(tree) -> tuple[list, list[str]]:
    """Leaves and their names: key paths joined by ``/`` (``jax.tree_util.keystr`` if that
    would make two names equal)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = ["/".join(_key_name(k) for k in path) or "value" for path, _ in flat]
    if len(set(names)) != len(names):
        names = [jax.tree_util.keystr(path) or "value" for path, _ in flat]
    return [leaf for _, leaf in flat], names


def _to_numpy(a, name) -> np.ndarray:
    if _tree.is_key(a):
        a = jax.random.key_data(a)
    arr = np.asarray(jax.device_get(a))
    if arr.dtype.name not in _CODES:
        raise TypeError(f"checkpoint.save: leaf {name!r} has dtype {arr.dtype}, which "
                        f"safetensors cannot hold (supported: {sorted(_CODES)})")
    return np.asarray(arr.astype(arr.dtype.newbyteorder("<")), order="C")  # keeps 0-d


# --------------------------------------------------------------------------- save

def _bytes(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8))


def save(path, tree: PyTree, *, metadata: dict | None = None) -> str:
    """Write ``tree`` (any pytree of arrays and Python scalars) to ``path`` atomically.

    ``metadata``: extra ``{str: str}`` entries for the header (keys starting ``fnn.`` are
    reserved). Returns ``path``. Raises ``TypeError`` for a leaf safetensors cannot hold
    (complex, object) before touching the disk.
    """
    path = os.fspath(path)
    leaves, names = _names(tree)
    arrays = [_to_numpy(a, n) for a, n in zip(leaves, names)]
    header, offset, digest = {}, 0, hashlib.sha256()
    for name, arr in zip(names, arrays):
        header[name] = {"dtype": _CODES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        digest.update(_bytes(arr))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if any(k.startswith("fnn.") for k in meta):
        raise ValueError("checkpoint.save: metadata keys starting with 'fnn.' are reserved")
    meta.update({"fnn.format": FORMAT, "fnn.sha256": digest.hexdigest(),
                 "fnn.tree": json.dumps(_tree.describe(tree, list(names)))})
    blob = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    _atomic_write(path, [struct.pack("<Q", len(blob)), blob]
                  + [_bytes(a) for a in arrays])
    return path


def _atomic_write(path, chunks):
    """Write ``chunks`` to a temporary file beside ``path``, fsync, rename, fsync the dir.

    Any ``OSError`` (disk full, file too large, permission denied, the directory gone) is
    raised again as an ``OSError`` of the same ``errno`` naming ``path``, after removing the
    temporary file; ``path`` itself is only ever replaced whole.
    """
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    with contextlib.suppress(OSError):      # not every platform can fsync a directory
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _write_error(path, e: OSError) -> OSError:
    """``e`` again, naming ``path``: ``[Errno 28] checkpoint.save: No space left on device:
    'out/ckpt.safetensors'`` (``OSError(errno, ...)`` picks the subclass: PermissionError...)."""
    if e.errno is None:
        return OSError(f"checkpoint.save: cannot write {path}: {e}")
    return OSError(e.errno, f"checkpoint.save: {e.strerror or os.strerror(e.errno)}", path)


# --------------------------------------------------------------------------- load

def _read(path) -> tuple[dict, dict, memoryview, dict | None]:
    """Parse and check an untrusted safetensors file: ``(entries, metadata, data bytes, tree
    description or None)``. Every problem is a :class:`CheckpointError` naming the file; no
    size the file claims is used before it is checked against the file's real size."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (the file has {len(raw)} "
                              f"bytes, fewer than the 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise CheckpointError(f"{path}: truncated or corrupt file: the header claims {n} bytes "
                              f"but the file has {len(raw)} in all")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}, not an object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt header: {str(e)[:200]}") from None
    meta = _check_metadata(path, header.pop("__metadata__", None))
    data = memoryview(raw)[8 + n:]
    _check_entries(path, header, len(data))
    if "fnn.sha256" in meta and hashlib.sha256(data).hexdigest() != meta["fnn.sha256"]:
        raise CheckpointError(f"{path}: corrupt data: the SHA-256 of the array bytes does not "
                              f"match the one recorded at save time")
    return header, meta, data, _tree_description(path, meta, header)


def _check_metadata(path, meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt header: __metadata__ must map strings to "
                              f"strings, got {_tree._short(meta)}")
    if meta.get("fnn.format", FORMAT) != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format "
                              f"{_tree._short(meta['fnn.format'])} (this fnn reads {FORMAT})")
    return meta


def _tree_description(path, meta, header):
    if "fnn.tree" not in meta:
        return None
    try:
        tree = json.loads(meta["fnn.tree"])
        _tree.check(tree, header)
    except (ValueError, RecursionError) as e:      # TreeError and JSONDecodeError included
        what = "nested too deep" if isinstance(e, RecursionError) else str(e)[:300]
        raise CheckpointError(f"{path}: corrupt metadata 'fnn.tree': {what}") from None
    return tree


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path, name, e):
    """The byte size entry ``e`` needs, after checking its dtype, shape and offsets' types."""
    ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in _DTYPES
          and isinstance(e.get("shape"), list) and len(e["shape"]) <= _MAX_RANK
          and all(_is_int(d) and d >= 0 for d in e["shape"]))
    if not ok:
        raise CheckpointError(f"{path}: corrupt header: bad entry for {_tree._short(name)}: "
                              f"{_tree._short(e, 200)} (need a dtype of {sorted(_DTYPES)} and "
                              f"a shape of at most {_MAX_RANK} non-negative ints)")
    o = e.get("data_offsets")
    if not (isinstance(o, list) and len(o) == 2 and all(_is_int(v) for v in o)):
        raise CheckpointError(f"{path}: corrupt header: bad data_offsets for "
                              f"{_tree._short(name)}: {_tree._short(o)}")
    itemsize = np.dtype(_np_dtype(e["dtype"])).itemsize
    if math.prod(max(d, 1) for d in e["shape"]) * itemsize >= 2 ** 62:
        raise CheckpointError(f"{path}: corrupt header: {_tree._short(name)} has the absurd "
                              f"shape {_tree._short(e['shape'])}")
    return math.prod(e["shape"]) * itemsize


def _check_entries(path, header, size):
    """Entries well formed, and their arrays back to back in offset order, filling the data."""
    needs = {name: _check_entry(path, name, e) for name, e in header.items()}
    end = 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, stop = e["data_offsets"]
        if begin != end or stop - begin != needs[name]:
            raise CheckpointError(f"{path}: corrupt header: {_tree._short(name)} ({e['dtype']} "
                                  f"{e['shape']}) needs {needs[name]} bytes at offset {end}, "
                                  f"the header says {begin}..{stop}")
        end = stop
    if end != size:
        what = "truncated" if end > size else "corrupt"
        raise CheckpointError(f"{path}: {what} file: the arrays need {end} bytes of data, the "
                              f"file holds {size}")


def _np_dtype(code):
    return jnp.bfloat16 if code == "BF16" else np.dtype(_DTYPES[code])


def _array(entry, data) -> np.ndarray:
    begin, end = entry["data_offsets"]
    dtype = np.dtype(_np_dtype(entry["dtype"])).newbyteorder("<")
    return np.frombuffer(data[begin:end], dtype=dtype).reshape(entry["shape"]).copy()


def read_metadata(path) -> dict:
    """The ``__metadata__`` of a checkpoint (the ``fnn.*`` entries and the user's)."""
    return dict(_read(os.fspath(path))[1])


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
    header, meta, data, structure = _read(path)
    if like is None:
        arrays = {name: _array(e, data) for name, e in header.items()}
        if structure is None:           # a plain safetensors file: a flat dict
            return arrays
        try:
            return _tree.rebuild(structure, arrays)
        except _tree.TreeError as e:
            raise CheckpointError(f"{path}: {e}") from None
    leaves, names = _names(like)
    _check_like(path, header, leaves, names)
    out = [_as_like(_array(header[n], data), leaf) for n, leaf in zip(names, leaves)]
    return jax.tree.unflatten(jax.tree.structure(like), out)


def _like_spec(leaf):
    if _tree.is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    if isinstance(leaf, (bool, int, float)):
        return (), None             # Python scalars take whatever scalar was stored
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return tuple(shape), np.dtype(leaf.dtype).name


def _check_like(path, header, leaves, names):
    problems = [f"missing from the file: {n!r}" for n in names if n not in header]
    problems += [f"in the file but not in like: {n!r}" for n in header if n not in names]
    for n, leaf in zip(names, leaves):
        if n not in header:
            continue
        shape, dtype = _like_spec(leaf)
        e = header[n]
        if shape is not None and tuple(e["shape"]) != shape:
            problems.append(f"{n!r}: shape {tuple(e['shape'])} in the file, {shape} in like")
        if type(leaf) is int and e["dtype"] not in _tree.INT_CODES:   # int(nan) would fail
            problems.append(f"{n!r}: a Python int in like, {e['dtype']} in the file")
        if dtype is not None and _DTYPES[e["dtype"]] != dtype:
            problems.append(f"{n!r}: dtype {_DTYPES[e['dtype']]} in the file, {dtype} in like")
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
