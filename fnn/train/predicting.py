"""Batched eval-mode outputs of a model: :func:`predict`.

The inputs are cut into batches of ``batch_size`` on the host (a NumPy ``x`` stays there; each
batch is moved to the device as it is used), every batch runs the same jitted
``model.apply(..., train=False)`` — the last, partial batch is padded with copies of the last
example and its outputs cut, so one program of one batch shape serves every batch — and the
outputs are concatenated on the device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fnn.data import num_examples
from fnn.precision import mixed_precision, policy
from fnn.train.cache import cached

__all__ = ["predict"]


def with_precision(model, precision, name):
    """``model`` under the mixed-precision policy ``precision`` (as ``fit(precision=...)``
    wraps it: ``mixed_precision(model, policy(precision))``), or ``model`` for ``None``."""
    if precision is None:
        return model
    try:
        p = policy(precision)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: precision={precision!r}: {e}") from None
    return mixed_precision(model, p)


@cached
def make_predict(model):
    """Jitted ``(params, state, x, kwargs) -> outputs`` of one batch in eval mode."""
    def run(params, state, x, kw):
        return model.apply(params, state, x, train=False, **kw)[0]
    return jax.jit(run)


def _batch(tree, start, stop, n):
    """Rows ``start:stop`` of every leaf, padded with copies of row ``n - 1`` to
    ``stop - start`` rows when ``stop > n``."""
    def take(a):
        part = jnp.asarray(a[start:min(stop, n)])      # NumPy rows move to the device here
        if stop <= n:
            return part
        return jnp.concatenate([part, jnp.repeat(part[-1:], stop - n, axis=0)])
    return jax.tree.map(take, tree)


def predict(model, params, state, x, *, batch_size: int = 512, precision=None,
            **model_kwargs):
    """``model``'s outputs on every example of ``x`` in eval mode (``train=False``), computed
    ``batch_size`` examples at a time.

    ``x``: an array, or a tuple of arrays for a model with several inputs, with the examples
    on the leading axis (NumPy arrays stay on the host until their batch runs).
    ``model_kwargs`` (``mask=``, ``lengths=``): per-example arrays, batched with ``x``.
    ``precision``: a :mod:`fnn.precision` policy (``"bfloat16"``, ``"float16"``, ...), applied
    as ``fit(precision=...)`` does: the outputs of ``mixed_precision(model, precision)``.
    Pass the same ``precision`` as the ``fit`` that trained the params.

    One jitted program serves every batch (the last is padded, its padding cut from the
    outputs), compiled once per batch shape and reused across calls. Returns the outputs for
    all ``n`` examples, concatenated on the device: an array, or the model's pytree (e.g. a
    tuple) of them.

    >>> import jax, numpy as np
    >>> from fnn.layers import Dense
    >>> net = Dense(3)
    >>> params, state, _ = net.init(jax.random.PRNGKey(0), (1, 4))
    >>> predict(net, params, state, np.ones((10, 4), np.float32), batch_size=4).shape
    (10, 3)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"predict: batch_size must be a positive int, got {batch_size!r}")
    if isinstance(x, list):
        x = tuple(x)
    n = num_examples((x, model_kwargs), "predict")
    if n == 0:
        raise ValueError("predict: x has 0 examples; pass at least one example "
                         "(leading axis of x)")
    run = make_predict(with_precision(model, precision, "predict"))
    size = min(int(batch_size), n)
    outs = [run(params, state, *_batch((x, model_kwargs), start, start + size, n))
            for start in range(0, n, size)]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts)[:n], *outs)
