"""fnn.sharding.checkpoint on the suite's one device: bit-exact round trips, interrupted saves
that leave the last good checkpoint, and refused mismatched or hostile files (saving on 8
devices and restoring on 2 and 1 is in test_sharding.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.sharding import checkpoint as sckpt

from helpers import assert_trees_close


def _state():
    r = np.random.default_rng(0)
    return {"w": jnp.asarray(r.normal(size=(4, 3))), "step": jnp.int32(7),
            "key": jax.random.key(5), "h": jnp.asarray(r.normal(size=(2,)), jnp.bfloat16)}


def test_checkpoint_round_trip_bit_exact(tmp_path):
    t = _state()
    sckpt.save(tmp_path / "c", t)
    back = sckpt.restore(tmp_path / "c", t)
    assert jax.tree.map(lambda a: a.dtype, back) == jax.tree.map(lambda a: a.dtype, t)
    assert_trees_close(back, t, rtol=0, atol=0)


@pytest.mark.parametrize("stage", ["shard file", "commit"])
def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, stage):
    """A save that dies while writing its shards, or just before its commit record, leaves
    the previous checkpoint loadable, bit for bit; the next good save cleans up."""
    from fnn.checkpoint import _format
    good = _state()
    sckpt.save(tmp_path / "c", good)
    newer = dict(good, w=good["w"] + 1)
    real_write = _format.atomic_write

    def die(path, chunks):               # killed writing a shard file, or the commit record
        if stage == "shard file" or os.path.basename(path) == "checkpoint.json":
            raise KeyboardInterrupt("killed")
        real_write(path, chunks)
    monkeypatch.setattr(_format, "atomic_write", die)
    with pytest.raises(KeyboardInterrupt):
        sckpt.save(tmp_path / "c", newer)
    monkeypatch.undo()
    assert len([v for v in os.listdir(tmp_path / "c") if v.startswith("v-")]) == 2
    np.testing.assert_array_equal(np.asarray(sckpt.restore(tmp_path / "c", good)["w"]),
                                  np.asarray(good["w"]))
    sckpt.save(tmp_path / "c", newer)
    assert len([v for v in os.listdir(tmp_path / "c") if v.startswith("v-")]) == 1
    np.testing.assert_array_equal(np.asarray(sckpt.restore(tmp_path / "c", good)["w"]),
                                  np.asarray(newer["w"]))


def test_checkpoint_mismatch_and_corruption(tmp_path):
    t = _state()
    sckpt.save(tmp_path / "c", t)
    with pytest.raises(sckpt.CheckpointMismatchError, match=r"'w': float64\(4, 3\) in the "
                                                            r"checkpoint, float64\(4, 4\)"):
        sckpt.restore(tmp_path / "c", dict(t, w=jnp.zeros((4, 4))))
    with pytest.raises(sckpt.CheckpointError, match=r"no sharded checkpoint here"):
        sckpt.restore(tmp_path / "nothing", t)
    (tmp_path / "c" / "checkpoint.json").write_text('{"format": "fnn-sharded-checkpoint/1"}')
    with pytest.raises(sckpt.CheckpointError, match=r"corrupt checkpoint record"):
        sckpt.restore(tmp_path / "c", t)


def test_checkpoint_piece_outside_its_array_is_refused(tmp_path):
    """A hostile shard file whose piece claims bounds outside the array is an error."""
    from fnn import checkpoint as ckpt
    t = {"w": jnp.zeros((2, 2))}
    sckpt.save(tmp_path / "c", t)
    rec = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    file = tmp_path / "c" / rec["version"] / "shards-00000.safetensors"
    ckpt.save(file, {"a0": np.zeros((2, 2))}, metadata={"pieces": "[[0, [[0, 2], [1, 3]]]]"})
    with pytest.raises(sckpt.CheckpointError, match=r"corrupt shard file: piece bounds"):
        sckpt.restore(tmp_path / "c", t)
