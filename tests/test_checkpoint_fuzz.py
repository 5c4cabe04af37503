"""Checkpoint files are untrusted: a seeded fuzz over generated malformed headers, random byte
flips and truncations of a real checkpoint. Each file must load or raise exactly
CheckpointError (or its mismatch subclass) naming the file; never another exception, and never
an allocation sized by what the file claims."""
import hashlib
import json
import struct
import tracemalloc
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import checkpoint
from fnn.checkpoint import CheckpointError, CheckpointMismatchError


class Adam(NamedTuple):
    count: jax.Array
    mu: dict


def _tree():
    return {"params": {"0": {"w": np.arange(6.0).reshape(2, 3), "b": np.zeros(3, np.float32)}},
            "opt": (Adam(np.int32(4), {"w": np.ones((2, 3))}), None, [np.uint8(7)]),
            "key": jax.random.key(1), "step": 12, "lr": 0.5, "flag": True,
            "half": jnp.array([1.5, -2.0], jnp.bfloat16), "empty": np.zeros((0, 4), np.int16)}


def _split(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


_VALUES = [None, True, -1, 0, 3, 2 ** 62, 2 ** 64, -(2 ** 63), 1.5, float("nan"), "", "F64",
           "BF16", "x" * 300, [], [0], [-1, 8], [8, 0], [0, 2 ** 70], [[0]], {}, {"a": "b"},
           [1] * 40, [2 ** 40, 2 ** 40, 2 ** 40]]


def _nodes(tree):
    """Every dict node of a parsed tree description, in a deterministic order."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            out.append(node)
            todo.extend(node.get("c", []))
    return out


def _mutate(header, rng):
    """One random structural change to a parsed header (entries, metadata or tree)."""
    header = json.loads(json.dumps(header))
    meta = header["__metadata__"]
    kind = rng.integers(6)
    value = _VALUES[rng.integers(len(_VALUES))]
    if kind == 0:                                   # an entry's field
        name = sorted(k for k in header if k != "__metadata__")[rng.integers(len(header) - 1)]
        field = ["dtype", "shape", "data_offsets", "extra"][rng.integers(4)]
        header[name][field] = value
    elif kind == 1:                                 # drop or add an entry
        name = sorted(header)[rng.integers(len(header))]
        header[name if rng.integers(2) else "new"] = value
    elif kind == 2:                                 # a metadata value
        meta[["fnn.sha256", "fnn.format", "fnn.tree", "user"][rng.integers(4)]] = value
    elif kind == 3 and rng.integers(2):             # the metadata itself
        header["__metadata__"] = value
    else:                                           # a node of the tree description
        tree = json.loads(meta["fnn.tree"])
        nodes = _nodes(tree)
        node = nodes[rng.integers(len(nodes))]
        key = ["t", "k", "c", "name", "py", "key_impl", "type", "names", "zz"][rng.integers(9)]
        if rng.integers(4) == 0:
            node.pop(key, None)
        else:
            node[key] = value if rng.integers(3) else ["leaf", "dict", "namedtuple", "opaque",
                                                       "list", "none"][rng.integers(6)]
        meta["fnn.tree"] = json.dumps(tree)
    return header


def _outcome(path, like):
    """'ok' or 'error'; anything but CheckpointError naming the file fails the test."""
    try:
        for f in (lambda: checkpoint.load(path), lambda: checkpoint.load(path, like=like),
                  lambda: checkpoint.read_metadata(path)):
            f()
    except CheckpointError as e:
        assert type(e) in (CheckpointError, CheckpointMismatchError)
        assert str(path) in str(e), str(e)
        return "error"
    return "ok"


def _rehashed(header, data, rng):
    """Random array bytes (NaN, inf, any bit pattern) under a matching SHA-256: the hash is no
    defence against a file crafted on purpose."""
    data = rng.bytes(len(data))
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"]["fnn.sha256"] = hashlib.sha256(data).hexdigest()
    return _join(header, data)


def _cases(raw, rng):
    header, data = _split(raw)
    n = struct.unpack("<Q", raw[:8])[0]
    for i in range(300):                            # generated malformed headers
        yield f"mutation {i}", _join(_mutate(header, rng), data)
    for i in range(150):                            # the same, with crafted data and hash
        mutated = _mutate(header, rng) if i % 3 else json.loads(json.dumps(header))
        yield f"crafted {i}", _rehashed(mutated, data, rng)
    for i in range(300):                            # byte flips, most in the header
        b = bytearray(raw)
        for _ in range(rng.integers(1, 4)):
            at = rng.integers(8 + n) if rng.integers(4) else rng.integers(len(b))
            b[at] ^= int(rng.integers(1, 256))
        yield f"flip {i}", bytes(b)
    for i in range(150):                            # truncations
        yield f"cut {i}", raw[:rng.integers(len(raw))]


def test_fuzzed_checkpoints_load_or_raise_checkpoint_error(tmp_path):
    tree = _tree()
    raw = open(checkpoint.save(tmp_path / "real.safetensors", tree), "rb").read()
    rng = np.random.default_rng(0)
    counts = {"ok": 0, "error": 0}
    for i, (what, content) in enumerate(_cases(raw, rng)):
        path = tmp_path / f"f{i}.safetensors"
        path.write_bytes(content)
        try:
            counts[_outcome(path, tree)] += 1
        except Exception as e:                       # report the case that escaped
            raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
        path.unlink()
    assert counts["error"] > 700 and counts["ok"] > 50, counts  # most cases are malformed


def test_a_flip_in_the_data_of_a_plain_safetensors_file_changes_values_only(tmp_path):
    """Without fnn's SHA-256 a data flip is a valid file: it loads, and only that byte moves."""
    a = np.arange(8, dtype=np.float32)
    raw = _join({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, a.tobytes())
    rng = np.random.default_rng(1)
    for i in range(50):
        b = bytearray(raw)
        at = len(raw) - 32 + int(rng.integers(32))
        b[at] ^= int(rng.integers(1, 256))
        path = tmp_path / f"p{i}.safetensors"
        path.write_bytes(bytes(b))
        got = checkpoint.load(path)["a"].tobytes()
        diff = [j for j in range(32) if got[j] != a.tobytes()[j]]
        assert diff == [at - (len(raw) - 32)]


@pytest.mark.parametrize("entry", [
    {"dtype": "F64", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 8 * 10 ** 12]},
    {"dtype": "U8", "shape": [2 ** 61], "data_offsets": [0, 2 ** 61]},
    {"dtype": "F32", "shape": [0, 2 ** 62], "data_offsets": [0, 0]},
    {"dtype": "F32", "shape": [2 ** 31] * 32, "data_offsets": [0, 8]},
])
def test_sizes_the_file_claims_are_never_allocated(tmp_path, entry):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(_join({"a": entry}, b"\0" * 8))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="huge.safetensors: (truncated|corrupt)"):
            checkpoint.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 ** 20, peak


def test_type_names_in_the_file_select_nothing(tmp_path):
    raw = open(checkpoint.save(tmp_path / "c.safetensors", {"w": np.ones(2)}), "rb").read()
    header, data = _split(raw)
    header["__metadata__"]["fnn.tree"] = json.dumps(
        {"t": "namedtuple", "type": "builtins.eval", "k": ["source"],
         "c": [{"t": "leaf", "name": "w"}]})
    path = tmp_path / "named.safetensors"
    path.write_bytes(_join(header, data))
    got = checkpoint.load(path)
    assert type(got).__name__ == "eval" and type(got) is not eval and got._fields == ("source",)
    assert type(got).__module__ != "builtins"
    np.testing.assert_array_equal(got.source, np.ones(2))
