"""fnn.train.resume called directly, in-process (no ``fit``, no subprocess): the backup file's
name and place, the arrays and the JSON metadata ``save_run`` writes (read back with
``fnn.checkpoint``, not with ``load_run``), ``load_run`` on a missing file, a round trip and a
mismatched tree, and ``restore_callbacks`` handing each callback its own state by position."""
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from fnn import checkpoint, optim, train
from fnn.train import resume


def _ts(w=(0.0, 0.0), lr=0.1, step=0, key=(0, 0)):
    params = {"w": jnp.asarray(w, jnp.float32)}
    return train.TrainState(params, {}, optim.sgd(lr).init(params),
                            jnp.asarray(step, jnp.int32), jnp.asarray(key, jnp.uint32))


class Both:
    """A callback with state: records what it was handed."""

    def __init__(self, state):
        self.state, self.got = state, []

    def get_state(self):
        return self.state

    def set_state(self, s):
        self.got.append(s)


class GetOnly:
    def get_state(self):
        return {"only": "get"}


class SetOnly:
    def __init__(self):
        self.got = []

    def set_state(self, s):
        self.got.append(s)


def test_backup_and_restore_object():
    cb = train.BackupAndRestore(pathlib.Path("out") / "run")
    assert cb.directory == os.path.join("out", "run") and type(cb.directory) is str
    assert cb.resume is True
    off = train.BackupAndRestore("d", resume=0)
    assert off.resume is False and off.directory == "d"
    assert cb(1, _ts(), {"loss": 1.0}) is None                          # fit does the saving
    assert repr(off) == "BackupAndRestore('d', resume=False)"
    assert repr(train.BackupAndRestore("e/f")) == "BackupAndRestore('e/f', resume=True)"
    assert resume.__all__ == ["BackupAndRestore"]


def test_path_is_the_fixed_file_in_the_directory(tmp_path):
    assert resume.FILE == "fit_state.safetensors"
    assert resume.path(tmp_path / "a") == os.path.join(str(tmp_path), "a",
                                                       "fit_state.safetensors")
    assert resume.path("x") == os.path.join("x", "fit_state.safetensors")


def test_save_run_writes_the_arrays_and_the_metadata(tmp_path):
    """Read back with fnn.checkpoint itself: train_state and early_stopping as arrays; under
    the metadata key "fit" a JSON object with the epoch, the history, the stop reason and one
    entry per callback (its get_state(), or null without one)."""
    ts = _ts(w=(1.5, -2.0), lr=0.25, step=7, key=(3, 4))
    es = {"best": jnp.asarray([0.5], jnp.float32)}
    history = {"loss": [1.0, 0.5], "val_loss": [2.0, 1.25]}
    cbs = [Both({"a": 1, "b": [2, 3]}), object(), GetOnly(), SetOnly()]
    resume.save_run(tmp_path / "d", ts, es, 2, history, cbs, "fit: stopped")
    p = tmp_path / "d" / "fit_state.safetensors"
    assert sorted(os.listdir(tmp_path / "d")) == ["fit_state.safetensors"]
    tree = checkpoint.load(p)
    assert sorted(tree) == ["early_stopping", "train_state"]
    np.testing.assert_array_equal(tree["train_state"].params["w"], [1.5, -2.0])
    assert int(tree["train_state"].step) == 7
    np.testing.assert_array_equal(tree["train_state"].key, [3, 4])
    np.testing.assert_allclose(tree["train_state"].opt_state[1].learning_rate, 0.25)
    np.testing.assert_array_equal(tree["early_stopping"]["best"], [0.5])
    meta = checkpoint.read_metadata(p)
    assert json.loads(meta["fit"]) == {
        "epoch": 2, "history": history, "stop_reason": "fit: stopped",
        "callbacks": [{"a": 1, "b": [2, 3]}, None, {"only": "get"}, None]}
    # a later epoch replaces the file; no early stopping and no reason are kept as such
    resume.save_run(str(tmp_path / "d"), ts, None, 3, {}, [], None)
    assert json.loads(checkpoint.read_metadata(p)["fit"]) == {
        "epoch": 3, "history": {}, "stop_reason": None, "callbacks": []}
    assert sorted(os.listdir(tmp_path / "d")) == ["fit_state.safetensors"]


def test_load_run_missing_round_trip_and_mismatch(tmp_path):
    assert resume.load_run(tmp_path / "none", _ts(), None) is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "something_else.safetensors").write_bytes(b"x")
    assert resume.load_run(tmp_path / "other", _ts(), None) is None
    saved = _ts(w=(1.5, -2.0), lr=0.25, step=7, key=(3, 4))
    es = {"best": jnp.asarray([0.5], jnp.float32), "wait": jnp.asarray(2, jnp.int32)}
    resume.save_run(tmp_path / "d", saved, es, 4, {"loss": [3.0]}, [Both({"k": 9})], "why")
    like_es = {"best": jnp.zeros(1, jnp.float32), "wait": jnp.zeros([], jnp.int32)}
    out = resume.load_run(tmp_path / "d", _ts(), like_es)
    assert isinstance(out, tuple) and len(out) == 3
    ts, es2, info = out
    assert isinstance(ts, train.TrainState)
    np.testing.assert_array_equal(ts.params["w"], [1.5, -2.0])
    assert int(ts.step) == 7 and ts.step.dtype == jnp.int32
    np.testing.assert_array_equal(ts.key, [3, 4])
    np.testing.assert_allclose(float(optim.learning_rate(ts.opt_state)), 0.25)
    np.testing.assert_array_equal(es2["best"], [0.5])
    assert int(es2["wait"]) == 2
    assert info == {"epoch": 4, "history": {"loss": [3.0]}, "stop_reason": "why",
                    "callbacks": [{"k": 9}]}
    resume.save_run(tmp_path / "e", saved, None, 1, {}, [], None)
    ts, es3, info = resume.load_run(str(tmp_path / "e"), _ts(), None)
    assert es3 is None and info["epoch"] == 1
    np.testing.assert_array_equal(ts.params["w"], [1.5, -2.0])
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"'train_state/params/w': shape \(2,\) in the file, \(3,\) in like"):
        resume.load_run(tmp_path / "e", _ts(w=(0.0, 0.0, 0.0)), None)


def test_restore_callbacks_by_position():
    a, b, c = Both({"x": 1}), Both(None), SetOnly()
    resume.restore_callbacks([a, object(), GetOnly(), b, c], [{"s": 1}, {"t": 2}, {"u": 3},
                                                              None, {"v": 4}])
    assert a.got == [{"s": 1}] and b.got == [] and c.got == [{"v": 4}]
    resume.restore_callbacks([], [])
    with pytest.raises(ValueError, match=r"^fit: resume: the saved run had 2 callbacks, this "
                                         r"one has 1$"):
        resume.restore_callbacks([a], [None, None])
    with pytest.raises(ValueError, match=r"^fit: resume: the saved run had 0 callbacks, this "
                                         r"one has 1$"):
        resume.restore_callbacks([a], [])
    assert a.got == [{"s": 1}]                   # a refused restore hands out nothing


def test_restore_then_save_round_trips_real_callbacks(tmp_path):
    """The callbacks fit backs up: their get_state() saved and handed back by position."""
    plateau = train.ReduceLROnPlateau(patience=3)
    plateau.best, plateau.wait = 0.75, 2
    log = train.CSVLogger(tmp_path / "log.csv")
    log(1, None, {"epoch": 1, "loss": 0.5})
    resume.save_run(tmp_path / "d", _ts(), None, 1, {}, [plateau, log], None)
    _, _, info = resume.load_run(tmp_path / "d", _ts(), None)
    fresh = [train.ReduceLROnPlateau(patience=3), train.CSVLogger(tmp_path / "log.csv")]
    resume.restore_callbacks(fresh, info["callbacks"])
    assert (fresh[0].best, fresh[0].wait) == (0.75, 2)
    assert fresh[1].get_state() == log.get_state()
