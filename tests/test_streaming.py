"""fit on a stream of batches: the same training as in memory, the data checks per batch, the
non-finite guard across chunks, streamed validation, and the ways a source can end."""
import numpy as np
import pytest

from helpers import assert_trees_close, xor_data

from fnn import losses, optim, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))
SGD = optim.sgd(0.2)


def _start(params, key):
    return train.create_train_state(MODEL, SGD, key, (8, 2), params=params)


def _batches(x, y, batch=8):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


@pytest.mark.parametrize("chunk", [3, 32])
def test_stream_trains_as_in_memory(chunk, key):
    """Batches of 8 in order (the last one of 2): six full batches in chunks of 3 (two full
    chunks) or 32 (one padded chunk), the partial one alone; params and history as in memory."""
    x, y = map(np.asarray, xor_data(50))
    ts = _start(MODEL.init(key, (8, 2))[0], key)
    kw = dict(epochs=2, train_state=ts, val_data=(x[:20], y[:20]))
    mem = train.fit(MODEL, CE, SGD, (x, y), batch_size=8, **kw,
                    loop=train.Loop(shuffle=False, progress=False))
    stream = train.fit(MODEL, CE, SGD, lambda epoch: _batches(x, y),
                       **{**kw, "val_data": lambda epoch: _batches(x[:20], y[:20], 16)},
                       loop=train.Loop(chunk=chunk, progress=False))
    assert_trees_close(stream.train_state.params, mem.train_state.params, rtol=1e-12, atol=1e-14)
    assert int(stream.train_state.step) == 14
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(stream.history[k], mem.history[k], rtol=1e-10)


def test_stream_checks_each_batch_and_guards_nonfinite_steps(key):
    x, y = map(np.asarray, xor_data(50))
    x = x.copy()
    x[35, 0] = np.nan                                   # batch 5 (1-based), its 4th example
    with pytest.raises(ValueError, match=r"fit: train_data \(batch 5 of the epoch\): x holds 1 "
                                         r"non-finite value\(s\) .* example 3"):
        train.fit(MODEL, CE, SGD, lambda e: _batches(x, y), epochs=1, key=key,
                  loop=train.Loop(progress=False))
    ts = _start(MODEL.init(key, (8, 2))[0], key)
    with pytest.warns(RuntimeWarning, match=r"epoch 1, step 4 \(update 5 of the epoch\); the "
                                            r"inputs of that batch hold NaN"):
        res = train.fit(MODEL, CE, SGD, lambda e: _batches(x, y), epochs=2, train_state=ts,
                        loop=train.Loop(progress=False, check_data=False, chunk=2))
    clean = train.fit(MODEL, CE, SGD, lambda e: _batches(x, y)[:4], epochs=1, train_state=ts,
                      loop=train.Loop(progress=False))
    assert_trees_close(res.train_state.params, clean.train_state.params, rtol=0, atol=0)
    assert int(res.train_state.step) == 4 and len(res.history["epoch"]) == 1


def test_one_shot_iterator_and_steps_per_epoch(key):
    x, y = map(np.asarray, xor_data(48))
    gen = iter(_batches(x, y))                           # six batches, consumed across epochs
    res = train.fit(MODEL, CE, SGD, gen, epochs=5, key=key,
                    loop=train.Loop(progress=False, steps_per_epoch=2))
    assert res.history["epoch"] == [1, 2, 3] and int(res.train_state.step) == 6
    assert "ran out before epoch 4" in res.stop_reason
    with pytest.raises(TypeError, match=r"fit: train_data: expected a tuple \(x, target\)"):
        train.fit(MODEL, CE, SGD, iter([x]), epochs=1, key=key)
    with pytest.raises(ValueError, match="the training data gave no batch"):
        train.fit(MODEL, CE, SGD, iter([]), epochs=1, key=key)


def test_errors_from_the_source_reach_the_caller(key):
    x, y = map(np.asarray, xor_data(16))

    def broken():
        yield x[:8], y[:8]
        raise OSError("disk went away")
    with pytest.raises(OSError, match="disk went away"):
        train.fit(MODEL, CE, SGD, broken(), epochs=1, key=key, loop=train.Loop(progress=False))
