"""Fully connected layers: ``Dense``, ``Flatten``, ``Embedding`` — op, backward, layer.

The dense op is the lesson's ``z = W·a + b`` in row-major batch form, ``y = x @ w + b`` with
``w`` of shape ``(in, out)`` (Flax's layout; PyTorch's ``nn.Linear.weight`` is ``wᵀ``).
"""
from __future__ import annotations


import math

import jax
import jax.numpy as jnp
import numpy as np

from fnn import initializers as inits
from fnn.checks import check_range
from fnn.core import Example, Layer, constructor, default_dtype, examples, from_backward, is_shape
from fnn.layers._param_shapes import check_param_shapes

__all__ = ["dense", "dense_backward", "Dense", "Flatten", "Embedding"]


def dense(x, w, b=None):
    """``y = x @ w + b``.

    **Arguments:** ``x: [..., in]``, ``w: [in, out]``, ``b: [out]`` or ``None``.
    **Returns:** ``[..., out]``.
    """
    y = jnp.matmul(x, w)
    return y if b is None else y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def dense_backward(x, w, dy, use_bias=True):
    """Hand-derived VJP of :func:`dense` — the lesson's delta rule.

    ``dw = xᵀ·dy`` (summed over every leading axis), ``db = Σ dy``, ``dx = dy·wᵀ``.
    Returns ``(dw, db or None, dx)``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw = x2.T @ dy2
    db = jnp.sum(dy2, axis=0) if use_bias else None
    dx = jnp.matmul(dy, w.T)
    return dw, db, dx


def _check_input(name, x, features_in):
    if not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected an array input, got {type(x).__name__}")
    if x.ndim < 1 or (features_in is not None and x.shape[-1] != features_in):
        raise ValueError(f"{name}: expected input of shape (batch, ..., {features_in or 'in'}), "
                         f"got shape {tuple(x.shape)}")


@examples(Example((4, 5), (3,)), Example((2, 3, 4), (6,), {"use_bias": False}),
          Example((5,), (3,)))
@constructor
def Dense(features: int, *, w_init=None, b_init=inits.zeros, use_bias: bool = True) -> Layer:
    """Fully connected layer ``y = x @ w + b`` over the last axis.

    **Arguments:** ``features``: output width. ``w_init``: kernel initializer, default He normal
    (variance ``2 / fan_in``), the lesson's advice for ReLU networks; use
    ``initializers.glorot_uniform()`` before tanh/sigmoid. ``b_init``: zeros.
    **Params:** ``{"w": (in, features), "b": (features,)}``; their shapes are checked against
    the input and ``features`` at trace time (a ``ValueError`` names the parameter and both
    shapes).
    **Input:** ``[..., in]`` with any leading axes, none included (as Flax's ``Dense``), so
    ``jax.vmap(lambda xi: model.apply(p, s, xi)[0])(x)`` works → **output**
    ``[..., features]``. ``init`` accepts an unbatched ``input_shape`` such as ``(in,)``.

    >>> params, state, out_shape = Dense(3).init(jax.random.PRNGKey(0), (4, 5))  # out (4, 3)
    >>> y, _ = Dense(3).apply(params, state, jnp.ones(5))                      # y: (3,)
    """
    if not isinstance(features, (int, np.integer)) or isinstance(features, bool) or features < 1:
        raise ValueError(f"Dense: features must be a positive int, got {features!r}")
    features = int(features)                  # NumPy ints (n_classes = y.max() + 1) are fine
    w_init = w_init or inits.he_normal()
    name = f"Dense({features})"

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) < 1:
            raise ValueError(f"Dense: expected input shape (..., features), got {input_shape}")
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (input_shape[-1], features), default_dtype())}
        if use_bias:
            params["b"] = b_init(kb, (features,), default_dtype())
        return params, {}, tuple(input_shape[:-1]) + (features,)

    def check(params, x):
        w = params.get("w") if isinstance(params, dict) else None
        _check_input("Dense", x, w.shape[0] if getattr(w, "ndim", 0) == 2 else None)
        shapes = {"w": (x.shape[-1], features), "b": (features,)}
        check_param_shapes(name, params, shapes if use_bias else {"w": shapes["w"]})

    def apply(params, state, x, *, key=None, train=False):
        check(params, x)
        return dense(x, params["w"], params.get("b")), state

    def backward(params, state, x, dy, *, key=None, train=False):
        check(params, x)
        dw, db, dx = dense_backward(x, params["w"], dy, use_bias)
        return ({"w": dw, "b": db} if use_bias else {"w": dw}), dx

    return from_backward(init, apply, backward, name=name)


@examples(Example((2, 3, 4)), Example((3, 5)))
@constructor
def Flatten() -> Layer:
    """Flatten every axis but the batch axis: ``[batch, d1, d2, ...] → [batch, d1·d2·...]``."""

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) < 1:
            raise ValueError(f"Flatten: expected input shape (batch, ...), got {input_shape}")
        return {}, {}, (input_shape[0], math.prod(input_shape[1:]))

    def apply(params, state, x, *, key=None, train=False):
        return x.reshape(x.shape[0], -1), state

    def backward(params, state, x, dy, *, key=None, train=False):
        return {}, dy.reshape(x.shape)

    return from_backward(init, apply, backward, name="Flatten")


def _token_ids(key, shape, dtype):
    return jax.random.randint(key, shape, 0, 7)


@examples(Example((4, 3), (7, 5), make_input=_token_ids))
@constructor
def Embedding(vocab: int, features: int, *, w_init=None) -> Layer:
    """Lookup table from integer ids to vectors: ``y = w[x]``.

    **Params:** ``{"w": (vocab, features)}``, default ``N(0, 1)`` (PyTorch's ``nn.Embedding``).
    **Input:** integer ids ``[batch, ...]`` → **output** ``[batch, ..., features]``.
    Backward: ``dw[v] = Σ_{positions with x = v} dy`` (a scatter-add); ``dx`` is ``None``.
    Ids outside ``[0, vocab)`` raise ``ValueError`` on concrete arrays (and in
    ``fnn.checks.checked`` mode under ``jit``). Unchecked under ``jit``: an id ``>= vocab`` or
    ``< -vocab`` gives a NaN row (``jnp.take`` fills), an id in ``[-vocab, 0)`` wraps as in
    NumPy; backward drops the ids ``>= vocab`` (and wraps the negative ones).
    """
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
               for n in (vocab, features)):
        raise ValueError(f"Embedding: vocab and features must be positive ints, got "
                         f"{vocab!r} and {features!r}")
    vocab, features = int(vocab), int(features)
    w_init = w_init or inits.normal(1.0)
    name = f"Embedding({vocab}, {features})"

    def init(key, input_shape):
        if not is_shape(input_shape):
            raise ValueError(f"Embedding: expected an input shape, got {input_shape}")
        return ({"w": w_init(key, (vocab, features), default_dtype())}, {},
                tuple(input_shape) + (features,))

    def _check(x):
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"Embedding: expected integer token ids, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        check_range(x, 0, vocab, name, "token id", " (the vocabulary)")

    def apply(params, state, x, *, key=None, train=False):
        _check(x)
        check_param_shapes(f"Embedding({vocab}, {features})", params, {"w": (vocab, features)})
        return jnp.take(params["w"], x, axis=0), state

    def backward(params, state, x, dy, *, key=None, train=False):
        _check(x)
        check_param_shapes(f"Embedding({vocab}, {features})", params, {"w": (vocab, features)})
        w = params["w"]
        # dy in w's dtype: a wider error (a float32 carried state upstream) would be a mixed-type
        # scatter, which JAX deprecates (an error in a future release)
        dw = jnp.zeros_like(w).at[x.reshape(-1)].add(dy.reshape(-1, w.shape[1]).astype(w.dtype))
        return {"w": dw}, None

    return from_backward(init, apply, backward, name=name, meta={"input_range": (0, vocab)})
