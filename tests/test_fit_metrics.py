"""Metrics inside fit's compiled epoch: against scikit-learn and NumPy on frozen params, and
what ``metrics="auto"``, ``()`` and a list compute."""
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import xor_data

from fnn import losses, optim, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))


def _start(model, optimizer, key, params, batch):
    return train.create_train_state(model, optimizer, key, batch, params=params)


def test_metrics_match_sklearn_and_numpy(key):
    """A frozen model (rate 0): every epoch's metrics are those of the fixed params on the whole
    set, summed over batches inside the epoch (macro F1 from epoch counts, not batch means)."""
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((37, 5)))
    y = jnp.asarray(rng.integers(0, 4, 37))
    net = Dense(4)
    params = net.init(key, (8, 5))[0]
    res = train.fit(net, CE, optim.sgd(0.0), (x, y), epochs=2, batch_size=8,
                    train_state=_start(net, optim.sgd(0.0), key, params, (8, 5)),
                    metrics=["accuracy", "top2_accuracy", "macro_f1"], val_data=(x, y),
                    loop=train.Loop(progress=False))
    z = np.asarray(net.apply(params, {}, x)[0])
    yn = np.asarray(y)
    top2 = np.mean([yn[i] in np.argsort(-z[i])[:2] for i in range(37)])
    f1 = f1_score(yn, z.argmax(1), average="macro")
    acc = np.mean(z.argmax(1) == yn)
    h = res.history
    for prefix in ("", "val_"):
        np.testing.assert_allclose(h[prefix + "accuracy"], [acc] * 2, rtol=1e-12)
        np.testing.assert_allclose(h[prefix + "top2_accuracy"], [top2] * 2, rtol=1e-12)
        np.testing.assert_allclose(h[prefix + "macro_f1"], [f1] * 2, rtol=1e-12)
    assert train.evaluate(net, CE, params, {}, (x, y), metrics=["macro_f1"])["macro_f1"] == \
        pytest.approx(f1, rel=1e-12)


def test_mean_absolute_error_metric(key):
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.standard_normal((20, 3))), jnp.asarray(rng.standard_normal((20, 2)))
    net = Dense(2)
    params = net.init(key, (8, 3))[0]
    res = train.fit(net, losses.mse, optim.sgd(0.0), (x, y), epochs=1, batch_size=8,
                    train_state=_start(net, optim.sgd(0.0), key, params, (8, 3)),
                    metrics=["mae"], loop=train.Loop(progress=False))
    want = np.mean(np.abs(np.asarray(net.apply(params, {}, x)[0]) - np.asarray(y)))
    np.testing.assert_allclose(res.history["mean_absolute_error"], [want], rtol=1e-12)
    with pytest.raises(ValueError, match="unknown metric 'bogus'"):
        train.fit(net, losses.mse, optim.sgd(0.0), (x, y), epochs=1, batch_size=8, key=key,
                  metrics=["bogus"])


def test_metrics_auto_and_explicit(key):
    x, y = xor_data(32)
    kw = dict(epochs=1, batch_size=8, key=key, loop=train.Loop(progress=False))
    auto = train.fit(MODEL, CE, optim.sgd(0.1), (x, y), **kw).history
    none = train.fit(MODEL, CE, optim.sgd(0.1), (x, y), metrics=(), **kw).history
    f1 = train.fit(MODEL, CE, optim.sgd(0.1), (x, y), metrics=["macro_f1"], **kw).history
    assert "accuracy" in auto and "accuracy" not in none and "accuracy" not in f1
    assert auto["loss"] == none["loss"] == f1["loss"] and "macro_f1" in f1
    assert "accuracy" not in train.fit(MODEL, losses.mse, optim.sgd(0.1),
                                       (x, np.eye(2)[y]), **kw).history
    with pytest.raises(ValueError, match=r"metrics must be 'auto' or a sequence.*\['macro_f1'\]"):
        train.fit(MODEL, CE, optim.sgd(0.1), (x, y), metrics="macro_f1", **kw)


def test_macro_f1_skips_a_class_absent_from_labels_and_predictions(key):
    """fnn documents scikit-learn's default: the mean over the classes present in the labels or
    the predictions. Class 3 is predicted but never a label: it counts (with F1 0). Class 4 of 5
    is never a label and never predicted (its logit is pushed far down): it does not count, as in f1_score(labels=the classes seen), and the result
    differs from f1_score(labels=range(5)), which counts it as 0."""
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((41, 3)))
    y = jnp.asarray(rng.integers(0, 3, 41))          # class 3: predicted, never a label
    net = Dense(5)
    params = net.init(key, (8, 3))[0]
    params = {**params, "b": params["b"].at[4].set(-1e3)}
    pred = np.asarray(net.apply(params, {}, x)[0]).argmax(1)
    yn = np.asarray(y)
    assert 4 not in pred and 4 not in yn and 3 in pred and 3 not in yn
    seen = np.union1d(yn, pred)
    want = f1_score(yn, pred, average="macro", labels=seen)
    assert want == pytest.approx(f1_score(yn, pred, average="macro"), rel=1e-15)
    all5 = f1_score(yn, pred, average="macro", labels=range(5), zero_division=0)
    assert abs(want - all5) > 1e-3                       # the two conventions differ here
    got = train.evaluate(net, CE, params, {}, (x, y), batch_size=8, metrics=["macro_f1"])
    assert got["macro_f1"] == pytest.approx(want, rel=1e-12)
    m = train.macro_f1                                   # the Metric itself, one batch
    assert float(m.result(m.stats(net.apply(params, {}, x)[0], y, jnp.ones(41)))) == \
        pytest.approx(want, rel=1e-12)
