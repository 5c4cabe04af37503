"""What fit refuses before the first epoch, in one line that says what to pass: empty data, a
dict or Python lists instead of arrays, and a ReduceLROnPlateau whose optimizer keeps its
learning rate where it cannot be changed (plain optax)."""
import re

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
