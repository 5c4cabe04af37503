"""fnn.train callbacks: early stopping (patience or a rule, best params restored), best and
last-N checkpoints, the CSV log, reduce-on-plateau (without a recompile), the wall-clock budget,
the progress bar's last line and backup-and-restore."""
import csv

import jax
import numpy as np
import pytest

from helpers import TRACES, assert_trees_close, counted_ce, xor_data

from fnn import checkpoint, losses, optim, regularizers, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))


def _snapshots():
    snap = {}
    return snap, lambda epoch, ts, logs: snap.setdefault(epoch, jax.tree.map(np.array, ts))


def test_checkpoints_best_and_last_n_and_csv_log(key, tmp_path):
    """Validation labels flipped: validation loss rises once the model learns, so the best
    epoch is early; best.safetensors holds that epoch's state, the last two epochs remain."""
    x, y = xor_data(48)
    snap, cb = _snapshots()
    ckpt = train.ModelCheckpoint(tmp_path / "ck", keep_last=2)
    log = train.CSVLogger(tmp_path / "log.csv")
    res = train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=6, batch_size=16, key=key,
                    val_data=(x, 1 - y), callbacks=[cb, ckpt, log],
                    loop=train.Loop(progress=False))
    h = res.history
    best = int(np.argmin(h["val_loss"])) + 1
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "best.safetensors", "epoch_0005.safetensors", "epoch_0006.safetensors"]
    like = res.train_state
    assert_trees_close(checkpoint.load(tmp_path / "ck" / "best.safetensors", like),
                       snap[best], rtol=0, atol=0)
    assert_trees_close(checkpoint.load(tmp_path / "ck" / "epoch_0006.safetensors",
                                       like), snap[6], rtol=0, atol=0)
    assert checkpoint.read_metadata(tmp_path / "ck" / "best.safetensors")["epoch"] == str(best)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == h["epoch"]
    for k in ("loss", "accuracy", "val_loss", "lr"):
        np.testing.assert_allclose([float(r[k]) for r in rows], h[k], rtol=1e-12)


def test_reduce_lr_on_plateau_follows_the_rule_without_recompiling(key):
    x, y = xor_data(48)
    seen = {}
    cb = lambda epoch, ts, logs: seen.setdefault(epoch, len(TRACES)) and None
    plateau = train.ReduceLROnPlateau(factor=0.5, patience=2)
    res = train.fit(MODEL, counted_ce, optim.adam(0.05), (x, y), epochs=8, batch_size=16, key=key,
                    val_data=(x, 1 - y), callbacks=[cb, plateau], loop=train.Loop(progress=False))
    lr, best, wait, want = 0.05, np.inf, 0, []
    for v in res.history["val_loss"]:                    # the rule, written out
        want.append(lr)
        if v < best:
            best, wait = v, 0
            continue
        wait += 1
        if wait >= 2:
            lr, wait = lr * 0.5, 0
    assert res.history["lr"] == pytest.approx(want, rel=1e-15) and min(want) < 0.05
    assert seen[1] == seen[8] == len(TRACES)             # no trace after the first epoch
    with pytest.raises(ValueError, match="ReduceLROnPlateau: cannot monitor 'val_loss'"):
        train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=1, batch_size=16, key=key,
                  callbacks=[train.ReduceLROnPlateau()], loop=train.Loop(progress=False))


def test_time_limit_stops_with_its_reason(key):
    x, y = xor_data(48)
    res = train.fit(MODEL, CE, optim.sgd(0.1), (x, y), epochs=50, batch_size=16, key=key,
                    callbacks=[train.TimeLimit(1e-6)], loop=train.Loop(progress=False))
    assert res.history["epoch"] == [1]
    assert res.stop_reason.startswith("fit: stopped after epoch 1: another epoch would exceed "
                                      "the time limit of 1e-06 s")
    with pytest.raises(ValueError, match="TimeLimit: seconds must be positive, got 0"):
        train.TimeLimit(0)


def test_backup_and_restore_resumes_unless_told_not_to(key, tmp_path):
    """A finished 2-epoch run backed up; epochs=3 again resumes after epoch 2 (the same state
    as 3 epochs in one go); resume=False starts afresh and overwrites the backup."""
    x, y = xor_data(48)
    kw = dict(batch_size=16, key=key, loop=train.Loop(progress=False))
    backup, seen = train.BackupAndRestore(tmp_path / "run"), []
    cb = lambda epoch, ts, logs: seen.append(epoch)
    train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=2, callbacks=[cb, backup], **kw)
    del seen[:]
    more = train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=3, callbacks=[cb, backup], **kw)
    whole = train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=3, **kw)
    assert seen == [3] and more.history["epoch"] == [1, 2, 3]
    assert_trees_close(more.train_state, whole.train_state, rtol=0, atol=0)
    fresh = train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=1, callbacks=[
        train.BackupAndRestore(tmp_path / "run", resume=False)], **kw)
    assert fresh.history["epoch"] == [1] and int(fresh.train_state.step) == 3
    meta = checkpoint.read_metadata(tmp_path / "run" / "fit_state.safetensors")
    assert '"epoch": 1' in meta["fit"]
    with pytest.raises(ValueError, match="more than one BackupAndRestore"):
        train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=1, callbacks=[backup, backup],
                  **kw)


def test_early_stopping_stops_and_restores_best(key):
    """Validation labels are the training labels flipped, so validation loss turns up while the
    model learns; with patience 2 the run stops two epochs after the best one (whichever that is
    for this initialization) and hands back that epoch's parameters."""
    x, y = xor_data(64)
    snap = {}
    cb = lambda epoch, ts, logs: snap.setdefault(epoch, jax.tree.map(np.array, ts.params)) \
        and None
    result = train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=20, batch_size=16, key=key,
                       val_data=(x, 1 - y), callbacks=[cb, train.EarlyStopping(2)],
                       loop=train.Loop(progress=False))
    h = result.history
    best = int(np.argmin(h["val_loss"])) + 1
    ran = len(h["epoch"])
    assert ran < 20 and result.best_epoch == best and ran == best + 2
    assert min(h["val_loss"][best:]) >= h["val_loss"][best - 1]
    assert sorted(snap) == list(range(1, ran + 1))
    assert f"early stopping after epoch {ran}" in result.stop_reason
    assert_trees_close(result.train_state.params, snap[best], rtol=0, atol=0)
    assert int(result.train_state.step) == 4 * ran    # the step count is not rolled back


def test_progress_bar_prints_why_training_stopped(key, capsys):
    """progress=True draws a tqdm bar; after it closes, the early-stopping line follows."""
    pytest.importorskip("tqdm")
    x, y = xor_data(40)
    res = train.fit(MODEL, CE, optim.sgd(0.1), (x, y), epochs=20, batch_size=16, key=key,
                    val_data=(x, 1 - y), callbacks=[train.EarlyStopping(1)],
                    loop=train.Loop(progress=True))
    assert res.stop_reason and res.stop_reason in capsys.readouterr().err


def test_early_stopping_takes_a_rule_and_refuses_two(key):
    """A fnn.regularizers.early_stopping rule stops as the same patience given as an int."""
    x, y = xor_data(48)
    kw = dict(epochs=20, batch_size=16, key=key, val_data=(x, 1 - y),
              loop=train.Loop(progress=False))
    by_int = train.fit(MODEL, CE, optim.adam(0.05), (x, y),
                       callbacks=[train.EarlyStopping(2, min_delta=1e-3)], **kw)
    by_rule = train.fit(MODEL, CE, optim.adam(0.05), (x, y), callbacks=[
        train.EarlyStopping(regularizers.early_stopping(2, 1e-3))], **kw)
    assert by_int.history["val_loss"] == by_rule.history["val_loss"]
    assert by_int.best_epoch == by_rule.best_epoch and len(by_int.history["epoch"]) < 20
    with pytest.raises(ValueError, match="min_delta belongs to the rule"):
        train.EarlyStopping(regularizers.early_stopping(2), min_delta=0.1)
    with pytest.raises(ValueError, match="more than one EarlyStopping"):
        train.fit(MODEL, CE, optim.adam(0.05), (x, y),
                  callbacks=[train.EarlyStopping(2), train.EarlyStopping(3)], **kw)


def _torch_plateau(values, lr, factor, patience, cooldown):
    """PyTorch's ``ReduceLROnPlateau.step`` (mode min, threshold 0 absolute), written out: the
    rate after each epoch. PyTorch cuts when the bad epochs exceed its patience, so fnn's
    ``patience=p`` is PyTorch's ``p - 1``; its cooldown counts every epoch after a cut,
    improving or not, and bad epochs in it do not count."""
    best, bad, cool, out = np.inf, 0, 0, []
    for v in values:
        if v < best:
            best, bad = v, 0
        else:
            bad += 1
        if cool > 0:
            cool, bad = cool - 1, 0
        if bad > patience - 1:
            lr, cool, bad = lr * factor, cooldown, 0
        out.append(lr)
    return out


@pytest.mark.parametrize("cooldown", [1, 2, 3])
def test_reduce_lr_on_plateau_waits_cooldown_epochs_after_a_cut(cooldown, key):
    """patience=1: every non-improving epoch would cut the rate, except the ``cooldown`` epochs
    after a cut, improving ones among them (epoch 9 improves inside a cooldown for each k)."""
    ts = train.create_train_state(Dense(2), optim.sgd(1.0), key, (1, 2))
    values = [1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    plateau = train.ReduceLROnPlateau(factor=0.5, patience=1, cooldown=cooldown)
    got = []
    for epoch, v in enumerate(values, 1):
        out = plateau(epoch, ts, {"val_loss": v})
        ts = out if out is not None else ts
        got.append(float(optim.learning_rate(ts.opt_state)))
    cuts = [e for e in range(2, len(got) + 1) if got[e - 1] < got[e - 2]]
    assert cuts[0] == 2 and len(cuts) >= 3
    for a, b in zip(cuts, cuts[1:]):          # no cut in the cooldown epochs after a cut...
        assert b - a > cooldown, (cooldown, cuts)
    assert got == _torch_plateau(values, 1.0, 0.5, 1, cooldown)     # ...and none later


def test_model_checkpoint_keeps_the_earlier_best_on_a_tie(key, tmp_path):
    """A later epoch that only equals the best so far (minimised or maximised) is not a new
    best: best.safetensors keeps the earlier epoch's state and metadata."""
    base = train.create_train_state(Dense(2), optim.sgd(1.0), key, (1, 2))
    states = {e: base._replace(params=jax.tree.map(lambda a: a + e, base.params))
              for e in range(1, 5)}
    for monitor, values in (("val_loss", [1.0, 0.5, 0.5, 0.7]),
                            ("val_accuracy", [0.5, 0.9, 0.9, 0.8])):
        directory = tmp_path / monitor
        ckpt = train.ModelCheckpoint(directory, monitor=monitor, keep_last=0)
        for epoch, v in enumerate(values, 1):
            ckpt(epoch, states[epoch], {monitor: v})
        best = directory / "best.safetensors"
        assert checkpoint.read_metadata(best)["epoch"] == "2", monitor
        assert_trees_close(checkpoint.load(best, like=base), states[2], rtol=0, atol=0)
