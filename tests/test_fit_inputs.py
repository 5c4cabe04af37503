"""What fit refuses before the first epoch, in one line that says what to pass: empty data, a
dict or Python lists instead of arrays, and a ReduceLROnPlateau whose optimizer keeps its
learning rate where it cannot be changed (plain optax)."""
import re
import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import xor_data

from fnn import losses, optim, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))
QUIET = train.Loop(progress=False)


def _fit(data, **kw):
    import jax
    kw = {"epochs": 1, "batch_size": 16, "key": jax.random.PRNGKey(0), "loop": QUIET, **kw}
    return train.fit(MODEL, CE, optim.sgd(0.1), data, **kw)


def test_empty_train_or_val_data_is_named_before_training():
    x, y = xor_data(32)
    with pytest.raises(ValueError, match=r"^fit: train_data has 0 examples$"):
        _fit((x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"^fit: val_data has 0 examples$"):
        _fit((x, y), val_data=(x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"^evaluate: data has 0 examples$"):
        train.evaluate(MODEL, CE, *MODEL.init(__import__("jax").random.PRNGKey(0), (1, 2))[:2],
                       (x[:0], y[:0]))


@pytest.mark.parametrize("where", ["train_data", "val_data"])
def test_a_dict_or_python_lists_get_one_line_saying_what_to_pass(where):
    x, y = xor_data(32)
    cases = {"dict": ({"x": x, "y": y}, r"expected a tuple \(x, target\), got a dict with "
                                        r"keys \['x', 'y'\]; pass \(x, target\) .* NumPy or "
                                        r"JAX arrays, e.g. \(d\['x'\], d\['y'\]\)"),
             "lists": ((np.asarray(x).tolist(), np.asarray(y).tolist()),
                       r"x is a Python list of numbers; pass \(x, target\) .* NumPy or JAX "
                       r"arrays, e.g. \(np.asarray\(x\), np.asarray\(y\)\)"),
             "list target": ((x, np.asarray(y).tolist()), r"target is a Python list of numbers")}
    for bad, pattern in cases.values():
        with pytest.raises(TypeError, match=rf"^fit: {where}: {pattern}") as e:
            _fit(bad) if where == "train_data" else _fit((x, y), val_data=bad)
        assert "\n" not in str(e.value) and len(str(e.value)) < 300 and "()" not in str(e.value)
    # a tuple of arrays as x (a model with two inputs) is data, not a list of numbers
    from fnn.train._batches import unpack
    assert len(unpack(((x, x), y), "fit: train_data")[0]) == 2


def test_reduce_lr_on_plateau_needs_a_rate_it_can_change_and_says_so_at_the_start():
    """Before: a plain optax optimizer trained until the first plateau, then the run was lost to
    'learning_rate: this optimizer state holds no learning rate'. Now no epoch runs."""
    import jax
    x, y = xor_data(32)
    ran = []
    kw = dict(epochs=3, batch_size=16, key=jax.random.PRNGKey(0), loop=QUIET, val_data=(x, y))
    plateau = train.ReduceLROnPlateau(patience=1)
    with pytest.raises(ValueError, match=r"^fit: ReduceLROnPlateau needs a learning rate it can "
                                         r"change.*optax\.adam\(0\.3\).* optax\.inject_hyperparams"
                                         r"\(optax\.adam\)\(learning_rate=0\.3\), or "
                                         r"fnn\.optim\.adam\(0\.3\)$"):
        train.fit(MODEL, CE, optax.adam(0.3), (x, y),
                  callbacks=[lambda e, ts, logs: ran.append(e), plateau], **kw)
    with pytest.raises(ValueError, match=r"^fit: ReduceLROnPlateau cannot change this "
                                         r"optimizer's rate: .*comes from a schedule"):
        train.fit(MODEL, CE, optim.adam(optim.schedules.linear(0.3, 0.0, 10)), (x, y),
                  callbacks=[lambda e, ts, logs: ran.append(e), plateau], **kw)
    assert ran == []
    # the adjustable forms named in the message train, the rate in the history
    for opt in (optax.inject_hyperparams(optax.adam)(learning_rate=0.3), optim.adam(0.3)):
        res = train.fit(MODEL, CE, opt, (x, y), callbacks=[train.ReduceLROnPlateau(patience=1)],
                        **kw)
        assert res.history["lr"][0] == pytest.approx(0.3)


def test_a_plain_optax_optimizer_warns_once_that_the_lr_column_is_nan():
    import warnings

    import jax
    x, y = xor_data(32)
    kw = dict(epochs=2, batch_size=16, key=jax.random.PRNGKey(0), loop=QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train.fit(MODEL, CE, optax.sgd(0.1), (x, y), **kw)
    said = [w for w in caught if "lr" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, UserWarning)
    assert re.search(r"holds no learning rate .* the history's lr is NaN; to have it recorded, "
                     r".*inject_hyperparams", str(said[0].message))
    assert said[0].filename == __file__               # points at the caller's fit(...) line
    assert len(res.history["lr"]) == 2 and all(np.isnan(res.history["lr"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train.fit(MODEL, CE, optim.sgd(0.1), (x, y), **kw)
    assert not [w for w in caught if "learning rate" in str(w.message)]
    assert res.history["lr"] == [pytest.approx(0.1)] * 2


def test_the_finiteness_check_counts_exactly_when_the_sum_overflows():
    """The data check's fast path trusts a finite sum; values whose sum overflows (each
    finite) must still pass, and a NaN or Inf among them is still counted and located
    (against NumPy's elementwise isfinite)."""
    from fnn.train.data_checks import _nonfinite
    big = np.full((6, 3), 3e38, np.float32)                  # finite, sum = inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # and no overflow warning
        assert _nonfinite(big) == (0, None)
    for bad, value in (((4, 1), np.nan), ((2, 0), np.inf), ((5, 2), -np.inf)):
        a = big.copy()
        a[bad] = value
        rows = np.flatnonzero(~np.isfinite(a).all(axis=1))
        assert _nonfinite(a) == (int((~np.isfinite(a)).sum()), int(rows[0])) == (1, bad[0])
    assert _nonfinite(np.arange(5)) == (0, None)              # integers: nothing to check
