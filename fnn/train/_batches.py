"""Batches as ``fit``, ``evaluate``, the streaming loop and ``lr_find`` read them (shared private
code of :mod:`fnn.train`)."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fnn.data import num_examples


_PASS = "pass (x, target) or (x, target, model_kwargs) with x and target NumPy or JAX arrays"


def _python_numbers(a) -> bool:
    """Whether ``a`` is a (nested) Python list or tuple of plain numbers, not of arrays."""
    while isinstance(a, (list, tuple)) and len(a):
        a = a[0]
    return isinstance(a, (bool, int, float, complex))


def unpack(data, name):
    """``(x, target)`` or ``(x, target, model_kwargs)`` -> ``(x, target, kwargs)``; a dict or
    Python lists of numbers are refused in one line saying what to pass."""
    if isinstance(data, Mapping):
        raise TypeError(f"{name}: expected a tuple (x, target), got a dict with keys "
                        f"{list(data)[:5]}; {_PASS}, e.g. (d['x'], d['y'])")
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        what = f"a {type(data).__name__}" + (f" of length {len(data)}"
                                             if isinstance(data, (tuple, list)) else "")
        raise TypeError(f"{name}: expected a tuple (x, target) or (x, target, model_kwargs), "
                        f"got {what}")
    for what, part in (("x", data[0]), ("target", data[1])):
        if _python_numbers(part):
            raise TypeError(f"{name}: {what} is a Python {type(part).__name__} of numbers; "
                            f"{_PASS}, e.g. (np.asarray(x), np.asarray(y))")
    kw = data[2] if len(data) == 3 else {}
    if not isinstance(kw, dict):
        raise TypeError(f"{name}: model_kwargs must be a dict of per-example arrays, "
                        f"got {type(kw).__name__}")
    return data[0], data[1], dict(kw)


def as_data(data, name):
    """``(x, target, kwargs)`` as JAX arrays and the example count (checked to agree)."""
    data = jax.tree.map(jnp.asarray, unpack(data, name))
    return data, num_examples(data, name)


def input_shape(x, batch_size):
    """The shape (a tuple of them for a tuple input) ``model.init`` gets for inputs like ``x``
    in batches of ``batch_size``."""
    if isinstance(x, (tuple, list)):
        return tuple((batch_size,) + tuple(np.shape(a)[1:]) for a in x)
    return (batch_size,) + tuple(np.shape(x)[1:])


def select(ok, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf (typed PRNG keys included)."""
    def pick(a, b):
        if jax.dtypes.issubdtype(jnp.asarray(a).dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                jnp.where(ok, jax.random.key_data(a), jax.random.key_data(b)),
                impl=jax.random.key_impl(a))
        return jnp.where(ok, a, b)
    return jax.tree.map(pick, new, old)
