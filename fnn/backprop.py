"""Manual backpropagation: gradients from the layers' hand-derived ``backward`` rules alone.

Two entry points:

- :func:`value_and_grad` — the lesson's algorithm generalised to any composition of layers:
  one forward pass keeping each layer's residuals (``fwd``), the output error from the
  loss's hand-derived gradient, errors propagated backward through every layer's ``bwd``,
  weight gradients formed on the way. No autodiff is involved; the result is jittable.
- :func:`custom_vjp` — the same model as a layer whose ``apply`` is a ``jax.custom_vjp``, so that
  ``jax.grad`` of *any* function of its output (your own loss, an optax loss, a regulariser
  added outside) runs the hand rules for the model's part.

>>> from fnn import backprop, losses
>>> from fnn.layers import Dense, Relu, serial
>>> model = serial(Dense(8), Relu(), Dense(2))
>>> params, state, _ = model.init(jax.random.PRNGKey(0), (32, 4))
>>> x, y = jnp.ones((32, 4)), jnp.zeros((32, 2))
>>> vg = jax.jit(backprop.value_and_grad(model, losses.mse))
>>> (loss, state), grads = vg(params, state, x, y)
>>> auto = jax.jit(jax.grad(lambda p: losses.mse(model.apply(p, state, x)[0], y)))(params)
>>> max(float(jnp.abs(g - a).max()) for g, a in zip(jax.tree.leaves(grads),
...                                                 jax.tree.leaves(auto))) < 1e-6
True
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fnn.core import Layer

__all__ = ["value_and_grad", "grad", "custom_vjp"]


def value_and_grad(model: Layer, loss, *, loss_kwargs: dict | None = None,
                   with_output: bool = False):
    """Build ``f(params, state, x, target, *, key=None, train=True, **kw)
    -> ((loss_value, new_state), grads)`` from hand-derived rules only.

    **Arguments:** ``model``: any :class:`fnn.Layer`. ``loss``: an :class:`fnn.losses.Loss`
    (anything with ``loss(pred, target, **loss_kwargs)`` and
    ``loss.grad(pred, target, **loss_kwargs)``). Extra keywords ``**kw`` (``lengths=``,
    ``mask=``) go to the model. ``with_output=True`` also returns the model's output:
    ``((loss_value, new_state, y), grads)``. Under ``jax.jit`` mark ``train`` static
    (``jax.jit(f, static_argnames="train")``): layers branch on it in Python.

    One forward pass, ``y, new_state, res = model.fwd(params, state, x)``, then
    ``grads = model.bwd(params, state, res, loss.grad(y, target))`` — backpropagation of the
    output error from the residuals that forward kept. ``new_state`` is the state ``apply``
    returns (batch-norm running statistics), ready for the next step.
    """
    if not hasattr(loss, "grad"):
        raise TypeError(f"value_and_grad: the loss needs a hand-derived .grad(pred, target); "
                        f"{loss!r} has none (use a loss from fnn.losses)")
    lkw = dict(loss_kwargs or {})

    def f(params, state, x, target, *, key=None, train=True, **kw):
        y, new_state, res = model.fwd(params, state, x, key=key, train=train, **kw)
        value = loss(y, target, **lkw)
        dy = loss.grad(y, target, **lkw)                      # output error ∂L/∂ŷ
        grads, _ = model.bwd(params, state, res, dy, key=key, train=train, **kw)
        return ((value, new_state, y) if with_output else (value, new_state)), grads

    return f


def grad(model: Layer, loss, **options):
    """Like :func:`value_and_grad` but returns only ``grads``."""
    vg = value_and_grad(model, loss, **options)

    def f(*args, **kw):
        return vg(*args, **kw)[1]
    return f


def custom_vjp(model: Layer) -> Layer:
    """``model`` as a layer whose ``apply`` carries its hand-derived backward as a
    ``jax.custom_vjp``: ``jax.grad`` through it runs the model's ``fwd`` once and its
    ``bwd`` from the residuals kept, never autodiff of ``model.apply``.

    The cotangent reaching ``apply``'s ``new_state`` output is ignored (state is not
    differentiated, as everywhere in fnn); ``state``, ``key`` and the extra keywords get zero
    cotangents. ``init``, ``backward``, ``fwd`` and ``bwd`` are the model's own.
    """

    def make(train: bool):
        @jax.custom_vjp
        def run(params, state, x, key, kw):
            return model.apply(params, state, x, key=key, train=train, **kw)

        def fwd(params, state, x, key, kw):
            y, new_state, res = model.fwd(params, state, x, key=key, train=train, **kw)
            # x is kept for its zero cotangent when bwd gives no dx (integer ids); most models'
            # first residual is x itself, so this holds no extra buffer
            return (y, new_state), (params, state, res, key, kw, x)

        def bwd(saved, cotangent):
            params, state, res, key, kw, x = saved
            dy, _ = cotangent
            dparams, dx = model.bwd(params, state, res, dy, key=key, train=train, **kw)
            return (dparams, jax.tree.map(_zero_cotangent, state),
                    jax.tree.map(_zero_cotangent, x) if dx is None else dx,
                    None if key is None else _zero_cotangent(key),
                    jax.tree.map(_zero_cotangent, kw))

        run.defvjp(fwd, bwd)
        return run

    runs = {True: make(True), False: make(False)}

    def apply(params, state, x, *, key=None, train=False, **kw):
        return runs[bool(train)](params, state, x, key, kw)

    spec = None if model.spec is None else ("custom_vjp", model.spec)   # same kind, other apply
    return model._replace(apply=apply, name=f"custom_vjp({model.name})", spec=spec)


def _zero_cotangent(a):
    """A zero cotangent for ``a``: zeros for floats, ``float0`` for ints, bools and keys."""
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)
