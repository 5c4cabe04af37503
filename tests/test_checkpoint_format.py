"""fnn.checkpoint's file layer (fnn/checkpoint/_format.py): the edges that mutation testing (#26)
showed no other test pinned: error texts kept from the OS, the atomic write's temporary file and
fsyncs, and the limits on untrusted headers at their exact boundaries."""
import errno
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from fnn import checkpoint
from fnn.checkpoint import CheckpointError


def _join(header, data=b""):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _write(path, content):
    path.write_bytes(content)
    return path


# --------------------------------------------------------------------------- writing

@pytest.mark.parametrize("strerror, shown", [
    ("quota of user 7 exceeded", "quota of user 7 exceeded"),   # the OS's own words are kept
    ("", os.strerror(errno.ENOSPC)),                            # none given: errno's standard text
])
def test_a_failed_write_keeps_the_os_message(tmp_path, monkeypatch, strerror, shown):
    def fail(*args):
        raise OSError(errno.ENOSPC, strerror)
    monkeypatch.setattr(os, "replace", fail)
    path = tmp_path / "c.safetensors"
    with pytest.raises(OSError) as info:
        checkpoint.save(path, {"w": np.ones(2)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == os.fspath(path)
    assert info.value.strerror == f"checkpoint.save: {shown}"


def test_the_temporary_file_is_hidden_beside_the_target_and_the_result_is_0644(tmp_path,
                                                                              monkeypatch):
    """The half-written file is a dotfile ending in .tmp in the target's folder (so a glob for
    *.safetensors never sees it and the rename stays on one filesystem); mkstemp's private
    0600 mode is not kept: the checkpoint is an ordinary rw-r--r-- file."""
    renames, real_replace = [], os.replace

    def spy(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", spy)
    path = checkpoint.save(tmp_path / "c.safetensors", {"w": np.ones(2)})
    [(src, dst)] = renames
    assert os.path.dirname(src) == str(tmp_path) and dst == os.fspath(path)
    name = os.path.basename(src)
    assert name.startswith(".c.safetensors.") and name.endswith(".tmp"), name
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_folder_that_cannot_be_fsynced_still_saves(tmp_path, monkeypatch):
    """Some platforms cannot open or fsync a directory: the save still succeeds."""
    real_open = os.open

    def no_dirs(file, *args, **kwargs):
        if os.path.isdir(file):
            raise OSError(errno.EISDIR, "cannot open a directory here")
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(os, "open", no_dirs)
    path = checkpoint.save(tmp_path / "c.safetensors", {"w": np.arange(3.0)})
    monkeypatch.undo()
    np.testing.assert_array_equal(checkpoint.load(path)["w"], np.arange(3.0))


# --------------------------------------------------------------------------- reading

def test_an_8_byte_file_is_judged_by_its_header(tmp_path):
    """8 bytes hold the header length: the file is not 'fewer than 8 bytes'; its (empty) header
    is what is wrong."""
    path = _write(tmp_path / "eight.safetensors", struct.pack("<Q", 0))
    with pytest.raises(CheckpointError, match="corrupt header") as info:
        checkpoint.load(path)
    assert "fewer than" not in str(info.value)
    path = _write(tmp_path / "seven.safetensors", b"\0" * 7)
    with pytest.raises(CheckpointError, match="the file has 7 bytes, fewer than the 8-byte"):
        checkpoint.load(path)


def test_the_header_length_is_unsigned(tmp_path):
    n = 2 ** 63 + 16                          # the top bit set: a huge length, not a negative one
    path = _write(tmp_path / "top.safetensors", struct.pack("<Q", n) + b"{}" + b" " * 14)
    with pytest.raises(CheckpointError, match=f"the header claims {n} bytes but the file has 24"):
        checkpoint.load(path)


def test_a_file_with_a_header_and_no_data_bytes_loads(tmp_path):
    """Only empty arrays: the file ends with the header (8 + n == its size)."""
    path = _write(tmp_path / "empty.safetensors",
                  _join({"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}))
    got = checkpoint.load(path)
    assert got["e"].shape == (0, 3) and got["e"].dtype == np.float32
    assert checkpoint.load(_write(tmp_path / "none.safetensors", _join({}))) == {}


def test_the_header_size_limit_is_inclusive(tmp_path, monkeypatch):
    from fnn.checkpoint import _format
    content = _join({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\7")
    path = _write(tmp_path / "h.safetensors", content)
    (n,) = struct.unpack("<Q", content[:8])
    monkeypatch.setattr(_format, "MAX_HEADER", n)              # exactly at the limit: read
    assert checkpoint.load(path)["w"].tolist() == [7]
    monkeypatch.setattr(_format, "MAX_HEADER", n - 1)          # one byte over: refused
    with pytest.raises(CheckpointError, match=f"the header claims {n} bytes"):
        checkpoint.load(path)


def test_a_header_that_is_not_a_json_object_says_what_it_is(tmp_path):
    path = _write(tmp_path / "list.safetensors", _join([1, 2]))
    with pytest.raises(CheckpointError, match="corrupt header: a JSON list, not an object"):
        checkpoint.load(path)


def test_plain_safetensors_metadata_without_an_fnn_format_is_read(tmp_path):
    """Files from other writers carry their own metadata and no fnn.format: not 'unknown'."""
    path = _write(tmp_path / "plain.safetensors",
                  _join({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "I16", "shape": [2], "data_offsets": [0, 4]}},
                        np.array([3, -4], "<i2").tobytes()))
    assert checkpoint.load(path)["w"].tolist() == [3, -4]
    assert checkpoint.read_metadata(path) == {"format": "pt"}


def test_a_tree_description_nested_too_deep_says_so(tmp_path):
    good = checkpoint.save(tmp_path / "good.safetensors", {"w": np.arange(3.0)})
    raw = Path(good).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    depth = 100_000
    header["__metadata__"]["fnn.tree"] = ('{"t":"list","c":[' * depth + '{"t":"leaf","name":"w"}'
                                          + "]}" * depth)
    path = _write(tmp_path / "deep.safetensors", _join(header, raw[8 + n:]))
    with pytest.raises(CheckpointError, match="corrupt metadata 'fnn.tree': nested too deep"):
        checkpoint.load(path)


def test_rank_32_is_the_highest_rank_read(tmp_path):
    def entry(rank):
        return {"w": {"dtype": "U8", "shape": [1] * rank, "data_offsets": [0, 1]}}
    got = checkpoint.load(_write(tmp_path / "r32.safetensors", _join(entry(32), b"\5")))
    assert got["w"].shape == (1,) * 32 and got["w"].ravel().tolist() == [5]
    with pytest.raises(CheckpointError, match="at most 32"):
        checkpoint.load(_write(tmp_path / "r33.safetensors", _join(entry(33), b"\5")))


def test_a_negative_dimension_is_a_bad_entry(tmp_path):
    path = _write(tmp_path / "neg.safetensors",
                  _join({"w": {"dtype": "F64", "shape": [-1, 8], "data_offsets": [0, 0]}}))
    with pytest.raises(CheckpointError, match="bad entry for 'w'.*non-negative ints"):
        checkpoint.load(path)


@pytest.mark.parametrize("dtype, shape, absurd", [
    ("U8", [2 ** 62], True),              # 2**62 bytes (4 EiB) or more: absurd
    ("U8", [1, 2 ** 62 - 1], False),      # one byte less: merely more than the file holds
    ("F64", [2 ** 60], True),             # 2**60 elements of 8 bytes: 2**63 bytes
    ("U16", [0, 2 ** 61], True),          # a zero dimension does not hide the others
])
def test_the_absurd_size_bound(tmp_path, dtype, shape, absurd):
    path = _write(tmp_path / "big.safetensors",
                  _join({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, 8]}}, b"\0" * 8))
    match = "has the absurd shape" if absurd else "needs .* bytes at offset 0"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path)


def test_arrays_that_share_or_skip_bytes_are_refused(tmp_path):
    w = {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}
    shared = _write(tmp_path / "shared.safetensors", _join({"a": w, "b": w}, b"\0" * 8))
    with pytest.raises(CheckpointError, match=r"'b' \(F64 \[1\]\) needs 8 bytes at offset 8, "
                                              r"the header says 0\.\.8"):
        checkpoint.load(shared)
    gap = _write(tmp_path / "gap.safetensors",
                 _join({"w": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}},
                       b"\0" * 16))
    with pytest.raises(CheckpointError, match=r"needs 8 bytes at offset 0, the header says 8\.\.16"):
        checkpoint.load(gap)


def _refusal(tmp_path, entry, data=b""):
    path = _write(tmp_path / "bad.safetensors", _join({"layer.w": entry}, data))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    return str(info.value)


def test_a_bad_entry_is_named_and_shown(tmp_path):
    """The refusal names the entry and shows what the file holds (here ~110 characters of it:
    shown whole)."""
    entry = {"dtype": "F99", "shape": [2, 3], "data_offsets": [0, 48], "note": "n" * 40}
    msg = _refusal(tmp_path, entry, b"\0" * 48)
    assert f"bad entry for 'layer.w': {entry!r} (need a dtype of" in msg, msg
    offsets = {"dtype": "F64", "shape": [2], "data_offsets": [0, "16"]}
    msg = _refusal(tmp_path, offsets, b"\0" * 16)
    assert "bad data_offsets for 'layer.w': [0, '16']" in msg, msg
    huge = {"dtype": "U8", "shape": [2 ** 40] * 3, "data_offsets": [0, 8]}
    msg = _refusal(tmp_path, huge, b"\0" * 8)
    assert f"'layer.w' has the absurd shape {[2 ** 40] * 3!r}" in msg, msg


def test_the_header_is_padded_to_a_multiple_of_8_whatever_its_length(tmp_path):
    """safetensors aligns the data on 8 bytes: header lengths of every residue mod 8 are padded
    with spaces (and the arrays follow right after)."""
    residues = set()
    for k in range(1, 9):
        path = checkpoint.save(tmp_path / f"p{k}.safetensors", {"w" * k: np.arange(2.0)})
        raw = Path(path).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        unpadded = len(raw[8:8 + n].rstrip(b" "))
        residues.add(unpadded % 8)
        assert n % 8 == 0 and n - unpadded < 8 and raw[8 + n:] == np.arange(2.0).tobytes()
    assert len(residues) == 8, residues


def test_metadata_refusals_show_the_value(tmp_path):
    w = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    future = _write(tmp_path / "v2.safetensors",
                    _join({"__metadata__": {"fnn.format": "fnn-checkpoint/2"}, "w": w}, b"\1"))
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'fnn-checkpoint/2' "
                                              r"\(this fnn reads fnn-checkpoint/1\)"):
        checkpoint.load(future)
    typed = _write(tmp_path / "typed.safetensors", _join({"__metadata__": {"epoch": 3}, "w": w},
                                                         b"\1"))
    with pytest.raises(CheckpointError, match=r"must map strings to strings, got \{'epoch': 3\}"):
        checkpoint.load(typed)
