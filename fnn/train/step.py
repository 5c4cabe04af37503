"""The train state and one train step (gradients by autodiff, by hand or by a given function).

One step, with ``t`` the update count ``train_state.step``::

    x, target = augment(fold_in(key, t), x, target)          # only with augment=
    key, k = split(key)                                      # only for a stochastic model
    loss, pred, state', g = value_and_grad(params, state, x, target, key=k)   (+ regularizer)
    updates, opt_state' = optimizer.update(g, opt_state, params)
    params' = params + updates

The epoch (``fnn.train.epoch``) runs this step with what the run reads and nothing else: the
metrics' sums are carried through the loop, the gradient norm only when asked for.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fnn import backprop, tuning
from fnn.precision import ScaledLoss, current_scale
from fnn.optim import apply_updates, global_norm
from fnn.layers._conv_layout import canonical_convs
from fnn.train.cache import cached
from fnn.train._batches import select, unpack
from fnn.train.metrics import accuracy_fn, mean_metric

PyTree = Any

__all__ = ["TrainState", "StepMetrics", "StepOut", "create_train_state", "make_step",
           "step_core"]


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
    gradient) and ``finite`` (loss and gradient are finite)."""

    loss: jax.Array
    accuracy: jax.Array
    grad_norm: jax.Array
    finite: jax.Array


class StepOut(NamedTuple):
    """Inside the epoch: the batch's ``loss``, whether it is ``finite``, ``grad_norm`` (NaN
    unless asked for), ``size`` (examples) and each metric's ``stats`` (sums over the batch)."""

    loss: jax.Array
    finite: jax.Array
    grad_norm: jax.Array
    size: int
    stats: tuple


def create_train_state(model, optimizer, key, input_shape, *, params=None, state=None
                       ) -> TrainState:
    """Initialise a :class:`TrainState`: ``model.init`` with one half of ``key`` (for whichever
    of ``params`` and ``state`` is not given), the optimizer's state, ``step = 0``, and the
    other half of ``key`` as the train key."""
    k_init, k_train = jax.random.split(key)
    if params is not None and state is None:
        state = _empty_state(model, input_shape)   # a stateless model: no init to run
    if params is None or state is None:
        init_params, init_state, _ = model.init(k_init, input_shape)
        params = init_params if params is None else params
        state = init_state if state is None else state
    return TrainState(params, state, optimizer.init(params), jnp.zeros((), jnp.int32), k_train)


@cached
def _empty_state(model, input_shape):
    """The model's state if it holds no arrays (``{}`` per layer, found by tracing ``init``
    once per model and shape), else ``None``."""
    spec = jax.eval_shape(lambda k: model.init(k, input_shape)[1], jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(spec)
    return None if leaves else jax.tree.unflatten(tree, [])


def _grad_fn(model, loss, grad, regularizer, need_pred):
    """``f(params, state, x, t, kw, key, scale=None) -> (loss, pred, new_state, grads)``;
    ``pred`` is ``None`` when not needed and not free. With a loss ``scale`` (a float32 scalar,
    :mod:`fnn.precision`) the gradients are those of ``scale · (loss + penalty)``; the loss
    returned is not scaled."""
    if grad == "autodiff":
        def f(params, state, x, t, kw, key, scale=None):
            def objective(p):
                pred, new_state = model.apply(p, state, x, key=key, train=True, **kw)
                value = loss(pred, t)
                total = value + (regularizer(p) if regularizer else 0.0)
                return total * (1 if scale is None else scale), (value, pred, new_state)
            # convolutions laid out for XLA:CPU (JAX's kernel gradients are slow in a loop)
            vg = canonical_convs(jax.value_and_grad(objective, has_aux=True))
            (_, (value, pred, new_state)), g = vg(params)
            return value, pred, new_state, g
        return f
    if grad == "manual":
        def f(params, state, x, t, kw, key, scale=None):
            scaled = loss if scale is None else ScaledLoss(loss, scale)
            vg = backprop.value_and_grad(model, scaled, with_output=True)
            (value, new_state, pred), g = vg(params, state, x, t, key=key, train=True, **kw)
            if regularizer:
                r = regularizer.grad(params)
                g = jax.tree.map(jnp.add, g, r if scale is None else
                                 jax.tree.map(lambda a: a * scale.astype(a.dtype), r))
            return value, pred, new_state, g
        return f
    if callable(grad):
        def f(params, state, x, t, kw, key, scale=None):
            if scale is not None:
                raise ValueError("fit: loss scaling needs grad='autodiff' or 'manual'; a "
                                 "gradient function cannot be told the scale")
            (value, new_state), g = grad(params, state, x, t, key=key, train=True, **kw)
            pred = model.apply(params, state, x, key=key, train=True, **kw)[0] if need_pred \
                else None
            if regularizer:
                g = jax.tree.map(jnp.add, g, regularizer.grad(params))
            return value, pred, new_state, g
        return f
    raise ValueError(f"train: grad must be 'autodiff', 'manual' or a function "
                     f"(params, state, x, target, *, key, train, **kw) -> ((loss, state), grads), "
                     f"got {grad!r}")


def all_finite(tree) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (a bool scalar; one read of each
    leaf, no arithmetic on its values, so a large finite gradient cannot overflow it; a small
    tree's leaves of one dtype joined into one vector first, see :data:`_JOINED`)."""
    ok, kinds = jnp.ones((), bool), {}
    for a in jax.tree.leaves(tree):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            kinds.setdefault(jnp.dtype(a.dtype).name, []).append(a)
    for leaves in kinds.values():
        if sum(a.size for a in leaves) <= _JOINED:  # small: one reduction, not one per leaf
            leaves = [jnp.concatenate([jnp.ravel(a) for a in leaves])]
        for a in leaves:
            ok = ok & jnp.all(jnp.isfinite(a))
    return ok


_JOINED = 2 ** 20
"""Up to this many values of one dtype, :func:`all_finite` checks them joined in one vector
(a copy at most this large): on XLA:CPU each reduction is a kernel of about a microsecond per
step, a tenth of a small model's step; above it the copy is not worth it."""


def step_core(model, loss, update, grad="autodiff", metrics=(), regularizer=None,
              grad_norm=False, augment=None, check_grads=True):
    """The unguarded step ``(train_state, (x, t, kw)) -> (train_state, StepOut)`` that
    :func:`make_step`, ``fit``'s compiled epochs and :func:`fnn.train.lr_find` run.

    ``update`` is the optimizer's ``update``; ``metrics`` a tuple of
    :class:`fnn.train.metrics.Metric`; ``finite`` judges the loss and the gradient (its norm
    when ``grad_norm``, else ``all_finite`` unless ``check_grads=False``), so a NaN gradient
    with a finite loss is seen in the step it appears. ``check_grads=False`` judges the loss
    alone (the norm when ``grad_norm``): ``fit``'s epochs check the state once at their end
    instead and replay with the check on when it is not finite
    (:func:`fnn.train.epoch.make_epoch_runner`)."""
    vg = _grad_fn(model, loss, grad, regularizer, bool(metrics))
    stochastic = getattr(model, "stochastic", True)

    def step(ts, batch):
        x, t, kw = batch
        if augment is not None:
            x, t = augment(jax.random.fold_in(ts.key, ts.step), x, t)
        key, sub = jax.random.split(ts.key) if stochastic else (ts.key, None)  # dropout keys
        ls = current_scale(ts.opt_state)          # loss scaling: the optimizer skips bad steps
        value, pred, new_state, grads = vg(ts.params, ts.state, x, t, kw, sub,
                                           None if ls is None else ls.scale)
        gnorm = global_norm(grads) if grad_norm else jnp.full((), jnp.nan)
        if ls is not None:
            gnorm = gnorm / ls.scale
        updates, opt_state = update(grads, ts.opt_state, ts.params)
        new = TrainState(apply_updates(ts.params, updates), new_state, opt_state, ts.step + 1,
                         key)
        size = jax.tree.leaves(x)[0].shape[0]
        w = jnp.ones((size,), jnp.result_type(float))
        stats = tuple(m.stats(pred, t, w) for m in metrics)
        # with loss scaling the optimizer itself skips a step whose gradient overflowed
        finite = jnp.isfinite(value)
        if ls is None and grad_norm:
            finite = finite & jnp.isfinite(gnorm)
        elif ls is None and check_grads:
            finite = finite & all_finite(grads)
        return new, StepOut(value, finite, gnorm, size, stats)
    return step


def make_step(model, loss, optimizer, *, grad: str | Callable = "autodiff", accuracy="auto",
              regularizer=None, guard: bool = True, grad_norm: bool = True,
              jit: bool = True) -> Callable:
    """The train step ``(train_state, batch) -> (train_state, StepMetrics)``, jitted.

    ``batch`` is ``(x, target)`` or ``(x, target, model_kwargs)``. One step: split the key,
    ``loss(model.apply(params, x, train=True), target)`` (plus ``regularizer(params)``) and its
    gradient by ``grad`` (``"autodiff"``, ``"manual"``, or a function shaped like
    :func:`fnn.backprop.value_and_grad`'s result that computes the same loss),
    ``optimizer.update``, ``params + updates``. With ``guard`` a non-finite loss or gradient
    leaves the state unchanged (``metrics.finite`` is then ``False``). ``grad_norm=False``
    skips the global gradient norm (NaN in the metrics); a non-finite gradient is then found by
    ``all_finite``. Any optax-shaped ``(init, update)`` optimizer
    works.
    """
    acc = accuracy_fn(loss, accuracy)
    metrics = (mean_metric("accuracy", acc),) if acc else ()
    core = step_core(model, loss, optimizer.update, grad, metrics, regularizer, grad_norm)

    def step(ts, batch):
        new, out = core(ts, unpack(batch, "train step"))
        accuracy = metrics[0].result(out.stats[0]) if metrics else jnp.full((), jnp.nan)
        m = StepMetrics(out.loss, accuracy, out.grad_norm, out.finite)
        return (select(out.finite, new, ts) if guard else new), m
    return tuning.jit(step) if jit else step      # jax.jit, compiler options by fnn.tuning
