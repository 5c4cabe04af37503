"""The safetensors file: write one atomically, read and check one as untrusted input.

Shared by :mod:`fnn.checkpoint` and :mod:`fnn.sharding.checkpoint` (its commit record uses
:func:`atomic_write`). The layout: an 8-byte little-endian header length ``N``; ``N`` bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces to a multiple of 8); then the arrays' raw little-endian bytes back to back.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fnn.checkpoint import _tree

FORMAT = "fnn-checkpoint/1"
MAX_HEADER = 100 * 2 ** 20
MAX_RANK = 32
DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
          "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "I32": "int32",
          "F32": "float32", "U64": "uint64", "I64": "int64", "F64": "float64"}
CODES = {v: k for k, v in DTYPES.items()}         # NumPy dtype name -> safetensors code


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not a checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose arrays do not match the tree given as ``like``."""


CheckpointError.__module__ = CheckpointMismatchError.__module__ = "fnn.checkpoint"

# --------------------------------------------------------------------------- writing


def to_numpy(a, name) -> np.ndarray:
    """A leaf as a C-ordered little-endian NumPy array (a typed PRNG key as its key data)."""
    if _tree.is_key(a):
        a = jax.random.key_data(a)
    arr = np.asarray(jax.device_get(a))
    if arr.dtype.name not in CODES:
        raise TypeError(f"checkpoint.save: leaf {name!r} has dtype {arr.dtype}, which "
                        f"safetensors cannot hold (supported: {sorted(CODES)})")
    return np.asarray(arr.astype(arr.dtype.newbyteorder("<")), order="C")  # keeps 0-d


def _bytes(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8))


def write(path, names: list[str], arrays: list[np.ndarray], meta: dict) -> None:
    """Write ``arrays`` (from :func:`to_numpy`) under ``names`` with the metadata ``meta``
    (``fnn.format`` and the data's ``fnn.sha256`` added) to ``path``, atomically."""
    header, offset, digest = {}, 0, hashlib.sha256()
    for name, arr in zip(names, arrays):
        header[name] = {"dtype": CODES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        digest.update(_bytes(arr))
    meta = {**meta, "fnn.format": FORMAT, "fnn.sha256": digest.hexdigest()}
    blob = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    atomic_write(path, [struct.pack("<Q", len(blob)), blob] + [_bytes(a) for a in arrays])


def atomic_write(path, chunks):
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


# --------------------------------------------------------------------------- reading

def read(path) -> tuple[dict, dict, memoryview, dict | None]:
    """Parse and check an untrusted safetensors file: ``(entries, metadata, data bytes, tree
    description or None)``. Every problem is a :class:`CheckpointError` naming the file; no
    size the file claims is used before it is checked against the file's real size."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (the file has {len(raw)} "
                              f"bytes, fewer than the 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER or 8 + n > len(raw):
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
                              f"strings, got {_tree.short(meta)}")
    if meta.get("fnn.format", FORMAT) != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format "
                              f"{_tree.short(meta['fnn.format'])} (this fnn reads {FORMAT})")
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
    ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in DTYPES
          and isinstance(e.get("shape"), list) and len(e["shape"]) <= MAX_RANK
          and all(_is_int(d) and d >= 0 for d in e["shape"]))
    if not ok:
        raise CheckpointError(f"{path}: corrupt header: bad entry for {_tree.short(name)}: "
                              f"{_tree.short(e, 200)} (need a dtype of {sorted(DTYPES)} and "
                              f"a shape of at most {MAX_RANK} non-negative ints)")
    o = e.get("data_offsets")
    if not (isinstance(o, list) and len(o) == 2 and all(_is_int(v) for v in o)):
        raise CheckpointError(f"{path}: corrupt header: bad data_offsets for "
                              f"{_tree.short(name)}: {_tree.short(o)}")
    itemsize = np.dtype(_np_dtype(e["dtype"])).itemsize
    if math.prod(max(d, 1) for d in e["shape"]) * itemsize >= 2 ** 62:
        raise CheckpointError(f"{path}: corrupt header: {_tree.short(name)} has the absurd "
                              f"shape {_tree.short(e['shape'])}")
    return math.prod(e["shape"]) * itemsize


def _check_entries(path, header, size):
    """Entries well formed, and their arrays back to back in offset order, filling the data."""
    needs = {name: _check_entry(path, name, e) for name, e in header.items()}
    end = 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, stop = e["data_offsets"]
        if begin != end or stop - begin != needs[name]:
            raise CheckpointError(f"{path}: corrupt header: {_tree.short(name)} ({e['dtype']} "
                                  f"{e['shape']}) needs {needs[name]} bytes at offset {end}, "
                                  f"the header says {begin}..{stop}")
        end = stop
    if end != size:
        what = "truncated" if end > size else "corrupt"
        raise CheckpointError(f"{path}: {what} file: the arrays need {end} bytes of data, the "
                              f"file holds {size}")


def _np_dtype(code):
    return jnp.bfloat16 if code == "BF16" else np.dtype(DTYPES[code])


def array(entry, data) -> np.ndarray:
    """The NumPy array a checked header entry describes, copied out of ``data``."""
    begin, end = entry["data_offsets"]
    dtype = np.dtype(_np_dtype(entry["dtype"])).newbyteorder("<")
    return np.frombuffer(data[begin:end], dtype=dtype).reshape(entry["shape"]).copy()
