"""fnn.train callbacks called directly (hand-made logs and train states, no ``fit``): the
defaults, the argument checks, each decision against hand-worked epochs, the checkpoint files and
their metadata, the CSV text, the messages and ``get_state``/``set_state`` in-process."""
import math
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from fnn import checkpoint, optim, regularizers, train
from fnn.train.callbacks import maximise


def _ts(lr=0.1):
    params = {"w": jnp.zeros(2)}
    return train.TrainState(params, {}, optim.sgd(lr).init(params), jnp.zeros([], jnp.int32),
                            jnp.zeros(2, jnp.uint32))


def _lr(ts):
    return float(optim.learning_rate(ts.opt_state))


def test_maximise_by_name():
    assert maximise("val_accuracy") and maximise("accuracy") and maximise("val_f1")
    assert not maximise("val_loss") and not maximise("accuracy_gap") and not maximise("f1_x")


def test_model_checkpoint_defaults_and_checks(tmp_path):
    cb = train.ModelCheckpoint(tmp_path)
    assert (cb.directory, cb.monitor, cb.keep_last, cb.save_best) == (
        str(tmp_path), "val_loss", 1, True)
    assert cb.best == math.inf and cb.kept == []
    assert train.ModelCheckpoint(tmp_path, keep_last=0).keep_last == 0
    with pytest.raises(ValueError, match=r"ModelCheckpoint: keep_last must be >= 0, got -1"):
        train.ModelCheckpoint(tmp_path, keep_last=-1)


def test_model_checkpoint_files_and_metadata(tmp_path):
    """val_loss 3, 1, 2, 0.5 with keep_last=2: best written at epochs 1, 2 and 4; the last two
    epochs' files remain; metadata holds the epoch and the monitored value."""
    cb = train.ModelCheckpoint(tmp_path, keep_last=2)
    ts = _ts()
    best_epochs = []
    for epoch, v in enumerate([3.0, 1.0, 2.0, 0.5], start=1):
        before = cb.best
        assert cb(epoch, ts, {"loss": 9.0, "val_loss": v}) is None
        if cb.best != before:
            best_epochs.append(epoch)
        meta = checkpoint.read_metadata(tmp_path / "best.safetensors")
        assert float(meta["val_loss"]) == min([3.0, 1.0, 2.0, 0.5][:epoch])
        last = checkpoint.read_metadata(tmp_path / f"epoch_{epoch:04d}.safetensors")
        assert int(last["epoch"]) == epoch and float(last["val_loss"]) == v
    assert best_epochs == [1, 2, 4] and cb.best == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors", "epoch_0003.safetensors", "epoch_0004.safetensors"]
    assert cb.kept == [str(tmp_path / "epoch_0003.safetensors"),
                       str(tmp_path / "epoch_0004.safetensors")]
    # the same epoch saved again is kept once; a kept file already gone is skipped
    cb(4, ts, {"val_loss": 5.0})
    assert cb.kept[-1] == str(tmp_path / "epoch_0004.safetensors") and len(cb.kept) == 2
    (tmp_path / "epoch_0003.safetensors").unlink()
    cb(5, ts, {"val_loss": 5.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors", "epoch_0004.safetensors", "epoch_0005.safetensors"]
    assert cb.get_state() == {"best": 0.5, "kept": cb.kept}


def test_model_checkpoint_maximised_monitor_and_no_best(tmp_path):
    cb = train.ModelCheckpoint(tmp_path / "a", monitor="val_accuracy", keep_last=0)
    ts = _ts()
    cb(1, ts, {"val_accuracy": 0.5})
    cb(2, ts, {"val_accuracy": 0.25})
    assert cb.best == -0.5
    meta = checkpoint.read_metadata(tmp_path / "a" / "best.safetensors")
    assert int(meta["epoch"]) == 1 and float(meta["val_accuracy"]) == 0.5
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["best.safetensors"]
    nb = train.ModelCheckpoint(tmp_path / "b", save_best=False, keep_last=1)
    nb(1, ts, {"loss": 1.0})          # no val_loss needed without save_best
    meta = checkpoint.read_metadata(tmp_path / "b" / "epoch_0001.safetensors")
    assert int(meta["epoch"]) == 1 and "val_loss" not in meta and "loss" not in meta
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch_0001.safetensors"]
    with pytest.raises(ValueError, match=r"ModelCheckpoint: cannot monitor 'val_loss'; this "
                                         r"run logs \['loss'\]"):
        train.ModelCheckpoint(tmp_path / "c")(1, ts, {"loss": 1.0})


def test_csv_logger_text(tmp_path):
    path = tmp_path / "sub" / "log.csv"
    cb = train.CSVLogger(path)
    cb(1, None, {"epoch": 1, "loss": 0.5})
    cb(2, None, {"epoch": 2, "loss": 0.25, "lr": 0.1})
    assert path.read_bytes() == b"epoch,loss,lr\n1,0.5,\n2,0.25,0.1\n"    # "\n", not "\r\n"
    assert not (tmp_path / "sub" / "log.csv.tmp").exists()
    again = train.CSVLogger(path)
    again.set_state(cb.get_state())
    again(3, None, {"epoch": 3, "loss": 0.125})
    assert path.read_text().splitlines()[-1] == "3,0.125,"


def test_reduce_lr_defaults_and_checks():
    cb = train.ReduceLROnPlateau()
    assert (cb.monitor, cb.factor, cb.patience, cb.min_delta, cb.cooldown, cb.min_lr,
            cb.verbose) == ("val_loss", 0.1, 5, 0.0, 0, 0.0, True)
    assert (cb.best, cb.wait, cb.cooling) == (math.inf, 0, 0)
    for bad in (0.0, 1.0, 1.5, -0.5):
        with pytest.raises(ValueError, match=rf"ReduceLROnPlateau: factor must be in \(0, 1\), "
                                             rf"got {bad}"):
            train.ReduceLROnPlateau(factor=bad)
    assert train.ReduceLROnPlateau(factor=0.999).factor == 0.999


def test_reduce_lr_patience_min_delta_cooldown(capsys):
    """patience 2, min_delta 0.1, cooldown 1, factor 0.5, lr 0.1. Epochs: 1.0 improves (best 1);
    0.95 is not better by more than 0.1 (wait 1); 0.95 (wait 2: cut to 0.05); 0.5 improves
    during the cooldown (cooling 1 -> 0, best 0.5); 0.5, 0.5 (wait 1, 2: cut to 0.025)."""
    cb = train.ReduceLROnPlateau(factor=0.5, patience=2, min_delta=0.1, cooldown=1)
    ts = _ts(0.1)
    lrs = []
    for epoch, v in enumerate([1.0, 0.95, 0.95, 0.5, 0.5, 0.5], start=1):
        out = cb(epoch, ts, {"val_loss": v})
        if out is not None:
            ts = out
        lrs.append(_lr(ts))
        if epoch == 4:
            assert cb.get_state() == {"best": 0.5, "wait": 0, "cooling": 0}
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.05, 0.05, 0.05, 0.025], rtol=1e-6)
    err = capsys.readouterr().err
    assert ("ReduceLROnPlateau: epoch 3: val_loss has not improved for 2 epochs; learning rate "
            "0.1 -> 0.05") in err
    assert "epoch 6: val_loss has not improved for 2 epochs; learning rate 0.05 -> 0.025" in err
    assert cb.get_state() == {"best": 0.5, "wait": 0, "cooling": 1}


def test_reduce_lr_min_lr_and_quiet(capsys):
    """min_lr 0.04 from 0.1, factor 0.5: 0.05, then max(0.025, 0.04) = 0.04, then no change."""
    cb = train.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_lr=0.04,
                                 verbose=False)
    ts = _ts(0.1)
    lrs = []
    for epoch in range(1, 5):
        out = cb(epoch, ts, {"loss": 1.0})
        if out is not None:
            ts = out
        lrs.append(_lr(ts))
    np.testing.assert_allclose(lrs, [0.1, 0.05, 0.04, 0.04], rtol=1e-6)
    assert out is None             # already at min_lr: nothing to change
    assert capsys.readouterr().err == ""


def test_reduce_lr_state_roundtrip():
    cb = train.ReduceLROnPlateau(patience=3)
    ts = _ts()
    cb(1, ts, {"val_loss": 2.0})
    cb(2, ts, {"val_loss": 3.0})
    assert cb.get_state() == {"best": 2.0, "wait": 1, "cooling": 0}
    other = train.ReduceLROnPlateau(patience=3)
    other.set_state({"best": 2.0, "wait": 2, "cooling": 4})
    assert (other.best, other.wait, other.cooling) == (2.0, 2, 4)
    other.set_state({"best": 1.5, "wait": 2, "cooling": 0})
    assert other(3, ts, {"val_loss": 3.0}) is not None       # wait reaches 3: a cut


def test_time_limit():
    with pytest.raises(ValueError, match=r"TimeLimit: seconds must be positive, got 0"):
        train.TimeLimit(0)
    cb = train.TimeLimit(10)
    assert cb.seconds == 10.0 and isinstance(cb.seconds, float)
    assert (cb.elapsed, cb.longest) == (0.0, 0.0)
    assert cb(1, None, {"time": 3.0}) is None          # 3 + 3 = 6 <= 10
    assert cb(2, None, {"time": 2.0}) is None          # 5 + 3 = 8
    assert cb.get_state() == {"elapsed": 5.0, "longest": 3.0}
    assert cb(3, None, {"time": 2.0}) == (              # 7 + 3 = 10, not over
        None)
    assert cb(4, None, {"time": 0.5}) == (              # 7.5 + 3 > 10
        "fit: stopped after epoch 4: another epoch would exceed the time limit of 10 s "
        "(7.5 s used)")
    again = train.TimeLimit(10)
    again.set_state({"elapsed": 6.0, "longest": 2.5})
    assert (again.elapsed, again.longest) == (6.0, 2.5)
    assert again(5, None, {"time": 1.0}) == (            # 7 + 2.5 <= 10
        None)
    assert again(6, None, {"time": 1.0}) is not None    # 8 + 2.5 > 10


def test_early_stopping_checks_and_defaults():
    es = train.EarlyStopping()
    assert es.monitor is None and es.restore_best is True and es.watching is None
    assert es.state is None
    for bad in (True, 2.0, "5"):
        with pytest.raises(TypeError, match=r"EarlyStopping: patience must be an int or a "
                                            r"fnn.regularizers.early_stopping\(...\) rule, got"):
            train.EarlyStopping(bad)
    rule = regularizers.early_stopping(2)
    with pytest.raises(ValueError, match=r"^EarlyStopping: min_delta belongs to the rule given "
                                         r"as patience \(fnn\.regularizers\.early_stopping"
                                         r"\(patience, min_delta\)\)$"):
        train.EarlyStopping(rule, min_delta=0.1)
    assert train.EarlyStopping(rule).rule is rule


def test_early_stopping_decisions_and_finish():
    """patience 2, min_delta 0.5 (the int form passes it on): 3, 2 (best), 1.6 (not better by
    more than 0.5: wait 1), 1.7 (wait 2: stop). finish restores epoch 2's params."""
    es = train.EarlyStopping(2, min_delta=0.5, monitor="val_loss")
    ts = _ts()
    es.start(ts, "loss")
    assert es.watching == "val_loss"
    for epoch, v in enumerate([3.0, 2.0, 1.6], start=1):
        t = ts._replace(params={"w": jnp.full(2, float(epoch))})
        assert es(epoch, t, {"val_loss": v}) is None
    t = ts._replace(params={"w": jnp.full(2, 4.0)})
    assert es(4, t, {"val_loss": 1.7}) == (
        "fit: early stopping after epoch 4: val_loss has not improved for 2 epochs")
    out, best = es.finish(t)
    assert best == 2
    np.testing.assert_array_equal(out.params["w"], [2.0, 2.0])
    keep = train.EarlyStopping(3, restore_best=False)
    keep.start(ts, "loss")
    assert keep.watching == "loss"
    with pytest.raises(ValueError, match=r"^fit: cannot monitor 'loss'; this run logs "
                                         r"\['val_loss'\]$"):
        keep(1, ts, {"val_loss": 1.0})
    keep(1, ts._replace(params={"w": jnp.ones(2)}), {"loss": 1.0})
    keep(2, t, {"loss": 2.0})
    out, best = keep.finish(t)
    assert best == 1
    np.testing.assert_array_equal(out.params["w"], [4.0, 4.0])


def test_early_stopping_finish_before_any_epoch_and_maximised():
    es = train.EarlyStopping(1, monitor="val_accuracy")
    ts = _ts()
    es.start(ts, "val_loss")
    t = ts._replace(params={"w": jnp.full(2, 7.0)})
    out, best = es.finish(t)                     # no epoch seen: params untouched
    assert best == 1
    np.testing.assert_array_equal(out.params["w"], [7.0, 7.0])
    assert es(1, t, {"val_accuracy": 0.5}) is None
    assert es(2, ts, {"val_accuracy": 0.75}) is None        # higher is better
    assert es(3, t, {"val_accuracy": 0.6}) is not None
    out, best = es.finish(t)
    assert best == 2
    np.testing.assert_array_equal(out.params["w"], [0.0, 0.0])


def test_early_stopping_restores_params_and_state_after_one_epoch():
    """One epoch seen (step 1): its params and model state are the best and come back."""
    es = train.EarlyStopping(3)
    ts = _ts()._replace(state={"m": jnp.zeros(1)})
    es.start(ts, "loss")
    first = ts._replace(params={"w": jnp.full(2, 1.0)}, state={"m": jnp.full(1, 3.0)})
    assert es(1, first, {"loss": 1.0}) is None
    now = ts._replace(params={"w": jnp.full(2, 5.0)}, state={"m": jnp.full(1, 6.0)})
    out, best = es.finish(now)
    assert best == 1
    np.testing.assert_array_equal(out.params["w"], [1.0, 1.0])
    np.testing.assert_array_equal(out.state["m"], [3.0])


def test_early_stopping_default_patience_and_half_rules():
    """The default patience is 5: a flat loss stops at the sixth epoch (five without a gain)."""
    es = train.EarlyStopping()
    ts = _ts()
    es.start(ts, "val_loss")
    assert [es(e, ts, {"val_loss": 1.0}) for e in range(1, 6)] == [None] * 5
    assert es(6, ts, {"val_loss": 1.0}) == (
        "fit: early stopping after epoch 6: val_loss has not improved for 5 epochs")
    for half in (SimpleNamespace(init=lambda p: p), SimpleNamespace(update=lambda s, v, p: s)):
        with pytest.raises(TypeError, match=r"EarlyStopping: patience must be an int"):
            train.EarlyStopping(half)
