"""Value checks for integer labels and token ids: eager on concrete arrays, opt-in under ``jit``.

The checks of the *data*; the lesson's debugging checklist is :func:`fnn.debug.checklist` and
the finite-difference gradient checks are :mod:`fnn.gradcheck`.

Shapes are static under ``jit`` and fnn checks them everywhere; *values* are only known on
concrete arrays. Integer class labels outside ``[0, classes)`` and token ids outside
``[0, vocab)`` are therefore checked in three places:

- **eagerly**, whenever a loss or an ``Embedding`` is called on concrete (non-traced) arrays:
  :func:`check_range` raises ``ValueError`` naming the loss or layer, the first offending value,
  its index and the valid range;
- **on the data, before training**: :func:`check_data` walks the model once (abstract
  ``init``, no FLOPs) to find the number of classes and the vocabularies of the ``Embedding``
  layers that read the raw input, then takes one vectorised NumPy ``min``/``max`` over the
  in-memory arrays; :func:`data_checker` returns the same check for streamed batches on the host;
- **inside ``jit``, opt-in**: :func:`checked` traces a function with the checks written as
  ``jax.experimental.checkify`` checks and returns ``(error, out)``; ``error.throw()`` raises.

Unchecked, under ``jit`` (what XLA's gathers do): ``Embedding`` with an id ``>= vocab`` or
``< -vocab`` returns a row of NaN (``jnp.take`` fills), an id in ``[-vocab, 0)`` wraps to
``vocab + id`` as in NumPy, and its backward drops out-of-range ids (wrapping the negative ones).
``softmax_cross_entropy_with_integer_labels`` with a label ``>= classes`` (or ``< -classes``)
gives a NaN loss, a label in ``[-classes, 0)`` the loss of class ``classes + label``; its
gradient uses a one-hot of the label, all zeros out of range (finite, but wrong).

>>> from fnn import losses
>>> from fnn.layers import Dense
>>> model, loss = Dense(3), losses.softmax_cross_entropy_with_integer_labels
>>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 3])            # 3 classes: label 3 is wrong
>>> check_data(model, loss, x, y)
Traceback (most recent call last):
ValueError: ...label 3 at index (3,) is outside the valid range [0, 3)...
>>> err, out = jax.jit(checked(loss))(jnp.zeros((4, 3)), y)   # traced: no eager check
>>> print(err.get())                                          # err.throw() raises it
softmax_cross_entropy_with_integer_labels: label 3 at index [3] is outside the valid range [0, 3)...
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from fnn.core import output_shape

__all__ = ["check_range", "checked", "check_data", "data_checker", "is_concrete"]

_MODE = threading.local()


def is_concrete(x) -> bool:
    """True for an array whose values are known now (not a tracer inside ``jit``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_range(x, lo: int, hi: int, who: str, what: str, note: str = ""):
    """Check that every value of the integer array ``x`` lies in ``[lo, hi)``.

    Concrete ``x``: one NumPy ``min``/``max``; on failure ``ValueError("<who>: <what> <v> at
    index <i> is outside the valid range [lo, hi)<note>")`` for the first offending entry.
    Traced ``x``: a ``checkify`` check inside :func:`checked`, nothing otherwise.
    """
    if not is_concrete(x):
        if getattr(_MODE, "on", False) and x.size:
            _checkify_range(x, lo, hi, who, what, note)
        return
    a = np.asarray(x)
    if a.size == 0 or (a.min() >= lo and a.max() < hi):
        return
    flat = a.reshape(-1)
    i = int(np.flatnonzero((flat < lo) | (flat >= hi))[0])      # failure path only
    index = tuple(int(j) for j in np.unravel_index(i, a.shape))
    raise ValueError(f"{who}: {what} {flat[i]} at index {index} is outside the valid range "
                     f"[{lo}, {hi}){note}")


def _checkify_range(x, lo, hi, who, what, note):
    flat = x.reshape(-1)
    bad = (flat < lo) | (flat >= hi)
    i = jnp.argmax(bad)                                         # first offending entry
    index = jnp.stack(jnp.unravel_index(i, x.shape))
    checkify.check(~jnp.any(bad), f"{who}: {what} {{value}} at index {{index}} is outside the "
                   f"valid range [{lo}, {hi}){note}", value=flat[i], index=index)


def checked(f: Callable) -> Callable:
    """``f`` with fnn's label and token-id checks traced in: returns ``(error, out)``.

    The checks are ``jax.experimental.checkify`` checks (``errors=checkify.user_checks``), so
    the result can be jitted; call ``error.throw()`` outside ``jit`` to raise, or
    ``error.get()`` for the message (``None`` if every check passed). Only code traced inside
    ``f`` is checked: a function jitted and cached before, unchecked, stays unchecked.

    >>> from fnn import losses
    >>> loss = losses.softmax_cross_entropy_with_integer_labels
    >>> err, out = jax.jit(checked(loss))(jnp.zeros((2, 3)), jnp.array([0, 2]))
    >>> print(err.get(), round(float(out), 4))                        # ln 3
    None 1.0986
    """
    def traced(*args, **kwargs):
        with _checking():
            return f(*args, **kwargs)
    return checkify.checkify(traced, errors=checkify.user_checks)


@contextlib.contextmanager
def _checking():
    before = getattr(_MODE, "on", False)
    _MODE.on = True
    try:
        yield
    finally:
        _MODE.on = before


# --------------------------------------------------------------------------- data checks

def _input_layers(layer):
    """The layers that receive the model's raw input: the model, then recursively the first
    child of a combinator (``serial``, ``residual``, ``stack``, a GPT), every child of
    ``parallel``."""
    yield layer
    kids = [child for _, child in layer.children]
    for child in (kids if layer.kind == "parallel" else kids[:1]):
        yield from _input_layers(child)


def data_checker(model, loss, input_shape) -> Callable:
    """A check of ``(x, target)`` against ``model`` and ``loss``, for the data or each batch.

    Built once (one abstract ``model.init`` at ``input_shape``): the number of classes (the
    last axis of the model's output) if ``loss`` takes integer labels (``loss.integer_labels``),
    and the ``(lo, hi)`` range of every layer reading the raw input that declares one
    (``Layer.meta["input_range"]``: ``Embedding``). The returned ``check(x, target, where="")`` costs a
    NumPy ``min``/``max`` per checked array and raises ``ValueError`` naming the loss or layer,
    the value, its index and the valid range (``where``, e.g. ``"batch 3"``, is prefixed).
    """
    ranges = [(l.name, l.meta["input_range"]) for l in _input_layers(model)
              if "input_range" in l.meta]
    classes = None
    if getattr(loss, "integer_labels", False):
        out = output_shape(model, tuple(input_shape))
        if out and all(isinstance(d, (int, np.integer)) for d in out):   # one output array
            classes = int(out[-1])

    def check(x, target, where: str = ""):
        pre = f"{where}: " if where else ""
        if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.integer):
            for name, (lo, hi) in ranges:
                check_range(x, lo, hi, f"{pre}{name}", "token id", " (the vocabulary)")
        if classes is not None and np.issubdtype(np.asarray(target).dtype, np.integer):
            check_range(target, 0, classes, f"{pre}{loss.name}", "label",
                        f" (the model has {classes} outputs)")
    return check


def check_data(model, loss, x, target, *, input_shape=None):
    """Check in-memory data ``(x, target)`` against ``model`` and ``loss`` before training.

    Labels of an integer-label loss must lie in ``[0, classes)`` (classes: the last axis of the
    model's output at ``input_shape``, default ``x.shape``); token ids in ``x`` must lie in the
    vocabulary of every ``Embedding`` that reads the raw input. One vectorised NumPy
    ``min``/``max`` per array; raises ``ValueError`` as :func:`data_checker`. Returns ``None``.

    >>> from fnn import losses
    >>> from fnn.layers import Dense
    >>> check_data(Dense(10), losses.softmax_cross_entropy_with_integer_labels,
    ...            jnp.ones((4, 64)), jnp.array([0, 3, 9, 1]))        # fine: returns None
    """
    shape = tuple(np.shape(x)) if input_shape is None else tuple(input_shape)
    data_checker(model, loss, shape)(x, target)
