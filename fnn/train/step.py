"""The train state, one train step (gradients by autodiff, by hand or by a given function),
and the data unpacking the step and the epoch share."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fnn import backprop
from fnn.data import num_examples
from fnn.optim import apply_updates, global_norm
from fnn.train.metrics import _accuracy_fn

PyTree = Any

class TrainState(NamedTuple):
    """Everything that changes while training, as one pytree (jit-, scan- and checkpoint-ready).

    ``params``, ``state`` (non-trainable, e.g. batch-norm statistics), ``opt_state``, ``step``
    (an int32 scalar: updates applied) and ``key`` (split once per epoch for the shuffle, and
    once per step for a stochastic model's ``apply``).
    """

    params: PyTree
    state: PyTree
    opt_state: PyTree
    step: jax.Array
    key: jax.Array


class StepMetrics(NamedTuple):
    """What one train step reports: ``loss`` (the batch's data loss, before the update),
    ``accuracy`` (NaN without an accuracy function), ``grad_norm`` (global L2 norm of the
    gradient) and ``finite`` (loss and gradient norm are finite)."""

    loss: jax.Array
    accuracy: jax.Array
    grad_norm: jax.Array
    finite: jax.Array



# --------------------------------------------------------------------------- pieces

def create_train_state(model, optimizer, key, input_shape, *, params=None, state=None
                       ) -> TrainState:
    """Initialise a :class:`TrainState`: ``model.init`` with one half of ``key`` (for whichever
    of ``params`` and ``state`` is not given), the optimizer's state, ``step = 0``, and the
    other half of ``key`` as the train key."""
    k_init, k_train = jax.random.split(key)
    if params is None or state is None:
        init_params, init_state, _ = model.init(k_init, input_shape)
        params = init_params if params is None else params
        state = init_state if state is None else state
    return TrainState(params, state, optimizer.init(params), jnp.zeros((), jnp.int32), k_train)

def _where(ok, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf (typed PRNG keys included)."""
    def pick(a, b):
        if jax.dtypes.issubdtype(jnp.asarray(a).dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                jnp.where(ok, jax.random.key_data(a), jax.random.key_data(b)),
                impl=jax.random.key_impl(a))
        return jnp.where(ok, a, b)
    return jax.tree.map(pick, new, old)


def _grad_fn(model, loss, grad, regularizer, need_pred):
    """``f(params, state, x, t, kw, key) -> (loss, pred, new_state, grads)``."""
    if grad == "autodiff":
        def f(params, state, x, t, kw, key):
            def objective(p):
                pred, new_state = model.apply(p, state, x, key=key, train=True, **kw)
                value = loss(pred, t)
                return value + (regularizer(p) if regularizer else 0.0), (value, pred, new_state)
            (_, (value, pred, new_state)), g = jax.value_and_grad(objective, has_aux=True)(params)
            return value, pred, new_state, g
        return f
    if grad == "manual" or callable(grad):
        vg = backprop.value_and_grad(model, loss) if grad == "manual" else grad

        def f(params, state, x, t, kw, key):
            (value, new_state), g = vg(params, state, x, t, key=key, train=True, **kw)
            pred = model.apply(params, state, x, key=key, train=True, **kw)[0] if need_pred \
                else None
            if regularizer:
                g = jax.tree.map(jnp.add, g, regularizer.grad(params))
            return value, pred, new_state, g
        return f
    raise ValueError(f"train: grad must be 'autodiff', 'manual' or a function "
                     f"(params, state, x, target, *, key, train, **kw) -> ((loss, state), grads), "
                     f"got {grad!r}")


def _step_core(model, loss, optimizer, grad="autodiff", accuracy=None, regularizer=None,
               grad_norm=True):
    """The unguarded step ``(train_state, (x, t, kw)) -> (train_state, StepMetrics)``."""
    vg = _grad_fn(model, loss, grad, regularizer, accuracy is not None)
    stochastic = getattr(model, "stochastic", True)

    def step(ts, batch):
        x, t, kw = batch
        key, sub = jax.random.split(ts.key) if stochastic else (ts.key, None)  # dropout keys
        value, pred, new_state, grads = vg(ts.params, ts.state, x, t, kw, sub)
        gnorm = global_norm(grads) if grad_norm else jnp.full((), jnp.nan)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        new = TrainState(apply_updates(ts.params, updates), new_state, opt_state, ts.step + 1,
                         key)
        acc = jnp.mean(accuracy(pred, t)) if accuracy else jnp.full((), jnp.nan)
        finite = jnp.isfinite(value) & (jnp.isfinite(gnorm) if grad_norm else True)
        return new, StepMetrics(value, acc, gnorm, finite)
    return step


def _unpack(data, name):
    """``(x, target)`` or ``(x, target, model_kwargs)`` -> ``(x, target, kwargs)``."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        what = f"a {type(data).__name__}" + (f" of length {len(data)}"
                                             if isinstance(data, (tuple, list)) else "")
        raise TypeError(f"{name}: expected a tuple (x, target) or (x, target, model_kwargs), "
                        f"got {what}")
    kw = data[2] if len(data) == 3 else {}
    if not isinstance(kw, dict):
        raise TypeError(f"{name}: model_kwargs must be a dict of per-example arrays, "
                        f"got {type(kw).__name__}")
    return data[0], data[1], dict(kw)


def _as_data(data, name):
    data = jax.tree.map(jnp.asarray, _unpack(data, name))
    return data, num_examples(data, name)


def make_step(model, loss, optimizer, *, grad: str | Callable = "autodiff", accuracy="auto",
              regularizer=None, guard: bool = True, grad_norm: bool = True,
              jit: bool = True) -> Callable:
    """The train step ``(train_state, batch) -> (train_state, StepMetrics)``, jitted.

    ``batch`` is ``(x, target)`` or ``(x, target, model_kwargs)``. One step: split the key,
    ``loss(model.apply(params, x, train=True), target)`` (plus ``regularizer(params)``) and its
    gradient by ``grad`` (``"autodiff"``, ``"manual"``, or a function shaped like
    :func:`fnn.backprop.value_and_grad`'s result that computes the same loss),
    ``optimizer.update``, ``params + updates``. With ``guard`` a non-finite loss or gradient leaves the state unchanged
    (``metrics.finite`` is then ``False``). ``grad_norm=False`` skips the global gradient norm
    (one more pass over the gradients; NaN in the metrics) and then judges finiteness by the
    loss alone. Any optax-shaped ``(init, update)`` optimizer works.
    """
    core = _step_core(model, loss, optimizer, grad, _accuracy_fn(loss, accuracy), regularizer,
                      grad_norm)

    def step(ts, batch):
        new, metrics = core(ts, _unpack(batch, "train step"))
        return (_where(metrics.finite, new, ts) if guard else new), metrics
    return jax.jit(step) if jit else step

