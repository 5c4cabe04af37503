"""fnn.train.TensorBoard: every column of the history, the learning rate included, read back from
the event file (TFRecords parsed here, each CRC32C checked by a bitwise implementation of the
polynomial, the Event protobuf decoded by tensorboardX's own schema) equals ``fit``'s history; a
resumed run logs each epoch once; a missing tensorboardX is named with the extra to install."""
import struct
import sys

import jax
import numpy as np
import pytest

from helpers import CrashAt, xor_data

from fnn import losses, optim, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _events(path):
    """Every Event in one TFRecord file, both CRCs of each record checked."""
    from tensorboardX.proto.event_pb2 import Event
    raw, out, i = path.read_bytes(), [], 0
    while i < len(raw):
        header = raw[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[i + 8:i + 12])[0] == _masked(header)
        data = raw[i + 12:i + 12 + n]
        assert len(data) == n, "a truncated record"
        assert struct.unpack("<I", raw[i + 12 + n:i + 16 + n])[0] == _masked(data)
        out.append(Event.FromString(data))
        i += 16 + n
    return out


def _scalars(log_dir):
    """``{tag: {step: value}}`` over every event file in ``log_dir``; a (tag, step) logged twice
    fails."""
    files = sorted(p for p in log_dir.iterdir() if "tfevents" in p.name)
    assert files, f"no event file in {log_dir}"
    got = {}
    for p in files:
        events = _events(p)
        assert events[0].file_version == "brain.Event:2"
        for e in events:
            for v in e.summary.value:
                steps = got.setdefault(v.tag, {})
                assert e.step not in steps, f"{v.tag} at step {e.step} logged twice"
                steps[e.step] = v.simple_value
    return got


def _assert_matches(got, history, epochs):
    assert set(got) == set(history) - {"epoch"}
    for tag, steps in got.items():
        assert sorted(steps) == list(epochs), tag
        want = np.float32([history[tag][e - 1] for e in epochs])
        np.testing.assert_array_equal(np.float32([steps[e] for e in epochs]), want,
                                      err_msg=tag)


def _fit(callbacks, epochs=6, optimizer=None):
    x, y = xor_data(48)
    return train.fit(MODEL, CE, optimizer or optim.adam(0.05), (x, y), epochs=epochs,
                     batch_size=16, key=jax.random.PRNGKey(0),
                     val_data=(x, 1 - y), metrics=["accuracy"],
                     step=train.Step(grad_norm=True), callbacks=callbacks,
                     loop=train.Loop(progress=False))


def test_every_history_column_and_the_learning_rate_read_back(tmp_path):
    """Flipped validation labels make val_loss rise, so ReduceLROnPlateau cuts the rate: the
    logged lr column changes within the run and must follow the history's."""
    pytest.importorskip("tensorboardX")
    res = _fit([train.ReduceLROnPlateau(factor=0.5, patience=2, verbose=False),
                train.TensorBoard(tmp_path / "tb")])
    h = res.history
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "grad_norm",
            "time"} <= set(h)
    assert len(set(h["lr"])) > 1                     # the rate was cut: lr is not a constant
    _assert_matches(_scalars(tmp_path / "tb"), h, range(1, 7))


def test_every_k_epochs_and_nan_learning_rate(tmp_path):
    """``every=2`` logs epochs 2, 4, 6 only; a plain optax optimizer's lr column (NaN in the
    history) is logged as NaN."""
    pytest.importorskip("tensorboardX")
    optax = pytest.importorskip("optax")
    res = _fit([train.TensorBoard(tmp_path / "tb", every=2)], optimizer=optax.adam(0.05))
    assert np.isnan(res.history["lr"]).all()
    _assert_matches(_scalars(tmp_path / "tb"), res.history, [2, 4, 6])



def test_a_resumed_run_logs_each_epoch_once(tmp_path):
    """A run crashes in epoch 3's callbacks (epoch 3 already in the event file, the backup at
    epoch 2); fresh callback objects resume it: each epoch is in the log once, with the values
    of the resumed run's history (epoch 3 the rerun's)."""
    pytest.importorskip("tensorboardX")

    def cbs(crash_at=None):
        return [train.TensorBoard(tmp_path / "tb"), CrashAt(crash_at),
                train.BackupAndRestore(tmp_path / "run")]

    with pytest.raises(RuntimeError, match="crash after epoch 3"):
        _fit(cbs(crash_at=3), epochs=5)
    assert sorted(_scalars(tmp_path / "tb")["loss"]) == [1, 2, 3]
    res = _fit(cbs(), epochs=5)
    assert res.history["epoch"] == [1, 2, 3, 4, 5]
    assert len([p for p in (tmp_path / "tb").iterdir()]) == 1     # appended to its own file
    _assert_matches(_scalars(tmp_path / "tb"), res.history, range(1, 6))


def test_the_same_callback_in_a_second_fit_starts_a_new_file(tmp_path):
    pytest.importorskip("tensorboardX")
    tb = train.TensorBoard(tmp_path / "tb")
    _fit([tb], epochs=2)
    first = {p.name for p in (tmp_path / "tb").iterdir()}
    _fit([tb], epochs=2)
    files = sorted((tmp_path / "tb").iterdir())
    assert len(files) == 2 and len(first) == 1
    for p in files:
        assert sorted(e.step for e in _events(p) if e.summary.value) == [1, 2]


def test_missing_tensorboardx_names_the_extra(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "tensorboardX" or name.startswith("tensorboardX."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)      # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fnn\[tensorboard\]'"):
        train.TensorBoard(tmp_path / "tb")


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_every_must_be_a_positive_int(tmp_path, every):
    with pytest.raises(ValueError, match="TensorBoard: every must be an int >= 1"):
        train.TensorBoard(tmp_path / "tb", every=every)
