"""fnn.checkpoint: bit-exact round trips, safetensors interoperability, atomic writes, and
clear errors for truncated, corrupt and mismatched files."""
import errno
import json
import os
import pickle
import struct
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnn import checkpoint, train
from fnn.checkpoint import CheckpointError, CheckpointMismatchError
from fnn.layers import Dense, Tanh, serial

safetensors_numpy = pytest.importorskip("safetensors.numpy")


class Running(NamedTuple):
    mean: jax.Array
    count: jax.Array


def _tree(key):
    """A TrainState with params, a batch-norm-like state and Adam state, plus odd leaves."""
    model = serial(Dense(3), Tanh(), Dense(2))
    ts = train.create_train_state(model, optax.adam(1e-3), key, (4, 5))
    ts = ts._replace(state={"bn": Running(jnp.linspace(-1, 1, 3), jnp.array(7, jnp.int32))},
                     opt_state=jax.tree.map(lambda a: a + 0.25 if a.dtype.kind == "f" else a,
                                            ts.opt_state))
    odd = {"flags": jnp.array([True, False, True]), "i8": jnp.arange(-3, 3, dtype=jnp.int8),
           "u16": jnp.arange(4, dtype=jnp.uint16), "f16": jnp.array([0.1, -2.5], jnp.float16),
           "bf16": jnp.array([1.5, -0.3], jnp.bfloat16), "f32": jnp.full((2, 0), 1, jnp.float32),
           "i64": jnp.array(2 ** 40, jnp.int64), "none": None, "empty": {}, "py": 3,
           "typed_key": jax.random.key(3)}
    return {"train_state": ts, "odd": odd, "list": [jnp.float64(np.pi), (jnp.ones(2),)]}


def _bits(a):
    if hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes()


def _assert_bit_exact(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert type(g) is type(w) or isinstance(w, jax.Array)
        assert _bits(g) == _bits(w)


def test_round_trip_is_bit_exact(key, tmp_path):
    tree = _tree(key)
    path = checkpoint.save(tmp_path / "ckpt.safetensors", tree, metadata={"epoch": 3})
    _assert_bit_exact(checkpoint.load(path, like=tree), tree)
    abstract = {"ts": tree["train_state"], "key": tree["odd"]["typed_key"]}  # like= shapes
    got = checkpoint.load(checkpoint.save(tmp_path / "b.safetensors", abstract),
                          like=jax.eval_shape(lambda: abstract))
    _assert_bit_exact(got, abstract)
    bare = checkpoint.load(path)                        # rebuilt from the metadata alone
    ts = bare["train_state"]
    assert type(ts).__name__ == "TrainState" and ts._fields == train.TrainState._fields
    assert type(ts.state["bn"]).__name__ == "Running" and ts.state["bn"].count.dtype == np.int32
    assert bare["odd"]["none"] is None and bare["odd"]["empty"] == {} and bare["odd"]["py"] == 3
    assert isinstance(bare["list"], list) and isinstance(bare["list"][1], tuple)
    assert _bits(bare["odd"]["typed_key"]) == _bits(tree["odd"]["typed_key"])
    np.testing.assert_array_equal(bare["train_state"].params["0"]["w"],
                                  tree["train_state"].params["0"]["w"])
    meta = checkpoint.read_metadata(path)
    assert meta["epoch"] == "3" and meta["fnn.format"] == checkpoint.FORMAT


def test_files_interoperate_with_safetensors(key, tmp_path):
    tree = {"params": jax.tree.map(np.asarray, _tree(key)["train_state"].params),
            "step": np.int32(5), "mask": np.array([True, False])}
    ours = checkpoint.save(tmp_path / "ours.safetensors", tree)
    theirs = safetensors_numpy.load_file(ours)
    assert sorted(theirs) == ["mask", "params/0/b", "params/0/w", "params/2/b", "params/2/w",
                              "step"]
    for name, arr in theirs.items():
        want = tree
        for part in name.split("/"):
            want = want[part]
        assert _bits(arr) == _bits(want)
    flat = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64)}
    safetensors_numpy.save_file(flat, tmp_path / "theirs.safetensors")
    for got in (checkpoint.load(tmp_path / "theirs.safetensors"),
                checkpoint.load(tmp_path / "theirs.safetensors", like=flat)):
        assert sorted(got) == ["a", "b"] and all(_bits(got[k]) == _bits(flat[k]) for k in flat)


def test_header_layout_is_the_safetensors_format(tmp_path):
    path = checkpoint.save(tmp_path / "c.safetensors", {"w": np.arange(3, dtype=np.float64)})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["w"] == {"dtype": "F64", "shape": [3], "data_offsets": [0, 24]}
    assert raw[8 + n:] == np.arange(3, dtype="<f8").tobytes()


def _corruptions(raw):
    n = struct.unpack("<Q", raw[:8])[0]
    bad_json = raw[:8] + b"#" + raw[9:]
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    return {
        "empty": (b"", "fewer than the 8-byte header length"),
        "cut in the header": (raw[:8 + n // 2], "truncated or corrupt file"),
        "cut in the data": (raw[:-5], "truncated file: the arrays need"),
        "header not JSON": (bad_json, "corrupt header"),
        "flipped data byte": (bytes(flipped), "corrupt data: the SHA-256"),
        "a pickle": (pickle.dumps({"w": np.ones(2)}), "truncated or corrupt|corrupt header"),
    }


def test_truncated_and_corrupt_files_raise_clear_errors(tmp_path):
    good = checkpoint.save(tmp_path / "good.safetensors", {"w": np.ones((2, 3))})
    raw = open(good, "rb").read()
    for what, (content, message) in _corruptions(raw).items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            checkpoint.load(path, like={"w": np.ones((2, 3))})
        assert str(path) in str(info.value), what
        assert path.read_bytes() == content             # reading never touches the file
    assert open(good, "rb").read() == raw


@pytest.mark.parametrize("extra", [b"\0", b"\0" * 8, b"PK\x03\x04 trailing junk"],
                         ids=["1-byte", "8-bytes", "junk"])
def test_trailing_bytes_without_a_checksum_are_refused(tmp_path, extra):
    """A plain safetensors file (written by safetensors itself: no fnn.sha256 to catch it) with
    bytes after the last array is corrupt: fnn.checkpoint.load and torch_weights.read_state_dict
    (which reads safetensors files with it) both refuse it, naming the file and the sizes."""
    from fnn import torch_weights
    flat = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64)}
    path = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file(flat, path)
    assert "fnn.sha256" not in checkpoint.read_metadata(path)
    assert sorted(torch_weights.read_state_dict(path)) == ["b", "w"]       # the clean file reads
    path.write_bytes(path.read_bytes() + extra)
    data = 6 * 4 + 2 * 8
    message = rf"plain.safetensors: corrupt file: the arrays need {data} bytes of data, the " \
              rf"file holds {data + len(extra)}"
    for read in (checkpoint.load, lambda p: checkpoint.load(p, like=flat),
                 torch_weights.read_state_dict):
        with pytest.raises(CheckpointError, match=message):
            read(path)


def test_mismatched_tree_lists_every_difference(tmp_path):
    path = checkpoint.save(tmp_path / "c.safetensors",
                           {"w": np.ones((2, 3)), "b": np.zeros(3), "n": np.int32(1)})
    before = open(path, "rb").read()
    like = {"w": np.ones((3, 2)), "b": np.zeros(3, np.float32), "extra": np.ones(1)}
    with pytest.raises(CheckpointMismatchError, match="4 differences") as info:
        checkpoint.load(path, like=like)
    msg = str(info.value)
    for part in ["missing from the file: 'extra'", "in the file but not in like: 'n'",
                 "'w': shape (2, 3) in the file, (3, 2) in like",
                 "'b': dtype float64 in the file, float32 in like", str(path)]:
        assert part in msg
    assert open(path, "rb").read() == before


def test_failed_saves_leave_the_old_checkpoint_in_place(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "c.safetensors", {"w": np.ones(3)})
    before = open(path, "rb").read()
    with pytest.raises(TypeError, match="leaf 'w' has dtype complex128"):
        checkpoint.save(path, {"w": np.ones(3, complex)})

    def crash(*args):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="checkpoint.save: cannot write .*c.safetensors: simulated"):
        checkpoint.save(path, {"w": np.zeros(3)})
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]   # no temporary file left behind
    with pytest.raises(ValueError, match="reserved"):
        checkpoint.save(path, {"w": np.zeros(3)}, metadata={"fnn.tree": "x"})


# --------------------------------------------------------------------------- untrusted files

def _raw_file(path, header, data=b""):
    """A safetensors file with exactly this JSON header (any content) and these data bytes."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _with_tree(tmp_path, tree_json, name="t"):
    """A real one-array checkpoint whose ``fnn.tree`` metadata is replaced by ``tree_json``."""
    good = checkpoint.save(tmp_path / "good.safetensors", {"w": np.arange(3.0)})
    raw = open(good, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["fnn.tree"] = tree_json
    return _raw_file(tmp_path / f"{name}.safetensors", header, raw[8 + n:])


def _load_fails(path, match, like=None):
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path, like=like)
    assert type(info.value) in (CheckpointError, CheckpointMismatchError)
    assert str(path) in str(info.value)


def test_metadata_of_the_wrong_type_is_a_checkpoint_error(tmp_path):
    entry = {"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}
    for i, meta in enumerate([{"fnn.sha256": 5}, [1, 2], "text", 7,
                              {"epoch": {"nested": "dict"}}, {"fnn.tree": None}]):
        path = _raw_file(tmp_path / f"m{i}.safetensors", {"__metadata__": meta, **entry},
                         np.float64(1).tobytes())
        _load_fails(path, "__metadata__")
        with pytest.raises(CheckpointError, match="__metadata__"):
            checkpoint.read_metadata(path)


def test_tree_descriptions_fnn_never_writes_are_checkpoint_errors(tmp_path):
    leaf = {"t": "leaf", "name": "w"}
    cases = {
        "unknown node type": ({"t": "function", "name": "os.system"}, "node type"),
        "not an object": ([leaf], "tree description"),
        "dict without keys": ({"t": "dict", "c": [leaf]}, "'dict' node"),
        "keys and children differ": ({"t": "dict", "k": ["a", "b"], "c": [leaf]}, "'dict' node"),
        "namedtuple field not a name": ({"t": "namedtuple", "type": "m.T", "k": ["__class__"],
                                         "c": [leaf]}, "field"),
        "namedtuple type not a name": ({"t": "namedtuple", "type": "m.1x", "k": ["a"],
                                        "c": [leaf]}, "type name"),
        "unknown Python scalar": ({"t": "leaf", "name": "w", "py": "eval"}, "Python type"),
        "unknown key impl": ({"t": "leaf", "name": "w", "key_impl": "os.system"}, "PRNG"),
        "leaf not in the file": ({"t": "leaf", "name": "nope"}, "not in the file"),
        "leaf used twice": ({"t": "list", "c": [leaf, leaf]}, "more than one leaf"),
        "array left out": ({"t": "none"}, "not in the tree"),
        "extra field": ({"t": "leaf", "name": "w", "import": "os"}, "field"),
        "scalar of three values": ({"t": "leaf", "name": "w", "py": "int"}, "scalar"),
        "not JSON": ("{'t': 'leaf'", "fnn.tree"),
    }
    for i, (what, (tree, match)) in enumerate(cases.items()):
        text = tree if isinstance(tree, str) else json.dumps(tree)
        _load_fails(_with_tree(tmp_path, text, f"c{i}"), match)


def test_a_tree_description_nested_thousands_deep_is_a_checkpoint_error(tmp_path):
    for depth in (100, 5000, 100_000):
        deep = '{"t":"list","c":[' * depth + '{"t":"leaf","name":"w"}' + "]}" * depth
        _load_fails(_with_tree(tmp_path, deep, f"d{depth}"), "nested|deep")
    raw_deep = {"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}
    path = tmp_path / "deep_header.safetensors"
    blob = json.dumps(raw_deep).encode()[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + np.float64(1).tobytes())
    _load_fails(path, "corrupt header")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.ENOENT])
@pytest.mark.parametrize("where", ["write", "mkstemp", "fsync", "replace"])
def test_failed_writes_name_the_file_and_leave_no_trace(tmp_path, monkeypatch, code, where):
    path = checkpoint.save(tmp_path / "c.safetensors", {"w": np.ones(3)})
    before = open(path, "rb").read()

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    if where == "write":
        real_fdopen = os.fdopen

        class Full:             # a file object whose writes fail as on a full disk
            def __init__(self, f):
                self.f = f

            def write(self, chunk):
                fail()

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    else:
        target = tempfile if where == "mkstemp" else os
        monkeypatch.setattr(target, where, fail)
    with pytest.raises(OSError, match=rf"checkpoint.save: {os.strerror(code)}: "
                       rf"'.*c\.safetensors'") as info:
        checkpoint.save(path, {"w": np.zeros(3)})
    assert info.value.errno == code and info.value.filename == path
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_a_directory_removed_during_the_write_names_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    path = checkpoint.save(folder / "c.safetensors", {"w": np.ones(3)})
    real_fsync = os.fsync

    def vanish(fd):             # the folder disappears between the write and the rename
        real_fsync(fd)
        for name in os.listdir(folder):
            os.unlink(folder / name)
        os.rmdir(folder)
    monkeypatch.setattr(os, "fsync", vanish)
    with pytest.raises(FileNotFoundError, match=r"checkpoint.save: No such file or directory: "
                       r"'.*run/c\.safetensors'"):
        checkpoint.save(path, {"w": np.zeros(3)})
    assert not folder.exists()


def test_numpy_scalars_and_python_scalars_round_trip_without_like(tmp_path):
    """np.float64 is a subclass of float: it must not be recorded as a Python scalar type fnn
    cannot rebuild (the reader knows bool/int/float only)."""
    tree = {"np": np.float64(0.25), "py": 0.5, "flag": False, "n": 3}
    got = checkpoint.load(checkpoint.save(tmp_path / "s.safetensors", tree))
    assert got["py"] == 0.5 and type(got["py"]) is float and got["flag"] is False
    assert type(got["n"]) is int and got["n"] == 3
    assert np.asarray(got["np"]).dtype == np.float64 and float(got["np"]) == 0.25


def test_python_scalar_leaves_need_a_stored_dtype_they_can_hold(tmp_path):
    good = checkpoint.save(tmp_path / "nan.safetensors", {"n": np.float64(np.nan)})
    raw = open(good, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["fnn.tree"] = json.dumps(
        {"t": "dict", "k": ["n"], "c": [{"t": "leaf", "name": "n", "py": "int"}]})
    path = _raw_file(tmp_path / "int_of_nan.safetensors", header, raw[8 + n:])
    _load_fails(path, "leaf 'n': a Python int stored as F64")
    _load_fails(good, "'n': a Python int in like, F64 in the file", like={"n": 3})
    assert checkpoint.load(good, like={"n": 0.5})["n"] != checkpoint.load(good)["n"]  # NaN
