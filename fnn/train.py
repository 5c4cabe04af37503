"""Training: a ``TrainState`` pytree, a jitted train step, whole epochs as one compiled call.

::

    result = fit(model, losses.softmax_cross_entropy_with_integer_labels, optim.adam(1e-3),
                 (x_train, y_train), epochs=20, batch_size=32, val_data=(x_val, y_val),
                 key=jax.random.PRNGKey(0), early_stopping=5)
    result.train_state.params, result.history["val_accuracy"]

Each epoch of :func:`fit` is **one** jitted call: a shuffle, a ``lax.while_loop`` of the train
step over the full minibatches (a scan that can stop early), then (when ``n % batch_size != 0``
and not ``drop_last``) one step on the remaining examples. Shapes are fixed by ``n`` and
``batch_size``, so the function is compiled once and every later epoch reuses it (and so does
a later ``fit`` with the same model, loss and optimizer objects and data sizes). The last
partial batch is a real smaller batch, not a padded one, so batch statistics (batch norm) see
only real examples.

Gradients come from ``jax.value_and_grad`` (``grad="autodiff"``), from the layers'
hand-derived rules via :func:`fnn.backprop.value_and_grad` (``grad="manual"``), or from any
function with that one's signature (``grad=fnn.models.value_and_grad(gpt, unroll=True)``, say).

NaN/Inf guard: the loop leaves the epoch at the first step whose loss or gradient norm is not
finite and reports its index; ``fit`` then replays the same compiled epoch up to the step
before it (same program, same inputs, so the same state bit for bit: the last good state) and
stops with a message naming the epoch and the step. A per-step select of the whole state would
cost every step (about half again on small models on CPU); the replay costs only when it fires.
"""
from __future__ import annotations

import functools
import math
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop
from fnn.core import default_dtype
from fnn.data import num_examples

__all__ = ["TrainState", "StepMetrics", "FitResult", "LRFindResult", "create_train_state",
           "make_step", "fit", "evaluate", "lr_find", "categorical_accuracy", "binary_accuracy"]

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


class FitResult(NamedTuple):
    """``train_state`` after training; ``history``: per-epoch lists (``epoch``, ``loss``,
    ``accuracy``, ``val_loss``, ``val_accuracy``, ``lr``, ``grad_norm``, ``time``);
    ``stop_reason``: ``None`` if all epochs ran; ``best_epoch`` (1-based) with early stopping."""

    train_state: TrainState
    history: dict
    stop_reason: str | None = None
    best_epoch: int | None = None


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


def categorical_accuracy(pred, target):
    """Per-example accuracy ``[batch]``: ``argmax(pred, -1) == label`` averaged over any axes
    between batch and classes. ``pred: [batch, ..., classes]``; ``target``: integer labels
    ``[batch, ...]`` or one-hot ``[batch, ..., classes]``."""
    labels = target if target.ndim == pred.ndim - 1 else jnp.argmax(target, axis=-1)
    hit = (jnp.argmax(pred, axis=-1) == labels).astype(default_dtype())
    return jnp.mean(hit.reshape(hit.shape[0], -1), axis=1)


@functools.lru_cache(maxsize=None)
def binary_accuracy(threshold: float = 0.5) -> Callable:
    """Per-example accuracy ``[batch]`` of ``pred > threshold`` against ``target > 0.5``
    (``threshold=0`` for logits, ``0.5`` for probabilities)."""
    def accuracy(pred, target):
        hit = ((pred > threshold) == (target > 0.5)).astype(default_dtype())
        return jnp.mean(hit.reshape(hit.shape[0], -1), axis=1)
    return accuracy


def _accuracy_fn(loss, accuracy):
    """``"auto"``: categorical for softmax losses, binary for the two BCE losses, else none."""
    if not (isinstance(accuracy, str) and accuracy == "auto"):
        return accuracy or None
    name = getattr(loss, "name", "")
    if "softmax" in name:
        return categorical_accuracy
    if name in ("sigmoid_binary_cross_entropy", "binary_cross_entropy"):
        return binary_accuracy(0.0 if name.startswith("sigmoid") else 0.5)
    return None


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)) + 0.0)


def _apply_updates(params, updates):
    return jax.tree.map(lambda p, u: (p + u).astype(jnp.asarray(p).dtype), params, updates)


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
        gnorm = _global_norm(grads) if grad_norm else jnp.full((), jnp.nan)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        new = TrainState(_apply_updates(ts.params, updates), new_state, opt_state, ts.step + 1,
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


def _cached(build):
    """Memoise ``build`` on its arguments, so a second ``fit``/``evaluate`` with the same model,
    loss and optimizer objects reuses the compiled function (unhashable ones build afresh)."""
    cache = functools.lru_cache(maxsize=32)(build)

    @functools.wraps(build)
    def get(*args):
        try:
            hash(args)
        except TypeError:
            return build(*args)
        return cache(*args)
    return get


def _put(ms, i, m):
    """Write step ``i``'s metrics into the per-step buffers."""
    return jax.tree.map(lambda buf, v: buf.at[i].set(v), ms, m)


@_cached
def _make_epoch(model, loss, optimizer, grad, accuracy, regularizer, grad_norm, n, batch_size,
                drop_last, shuffle):
    """One jitted epoch ``(ts, data, limit) -> (ts, steps_run, bad, per-step StepMetrics)``.

    Shuffles, then runs the full batches in a ``lax.while_loop`` that leaves at the first
    non-finite step or after ``limit`` updates, then the partial batch. ``bad``: the last step
    run was non-finite; its update went in, so the last good state is a replay of the same
    call with ``limit = steps_run - 1`` (same program, same inputs: the same state, bit for
    bit). The common path thus pays nothing for the guard.
    """
    full, tail = divmod(n, batch_size)
    tail = 0 if drop_last else tail
    if full + (tail > 0) == 0:
        raise ValueError(f"fit: {n} examples make no batch of {batch_size} with drop_last=True")
    core = _step_core(model, loss, optimizer, grad, accuracy, regularizer, grad_norm)

    def epoch(ts, data, limit):
        key, pkey = jax.random.split(ts.key)
        if shuffle:
            order = jax.random.permutation(pkey, n)
            data = jax.tree.map(lambda a: a[order], data)
        head = jax.tree.map(                             # (full, batch, ...)
            lambda a: a[:full * batch_size].reshape((full, batch_size) + a.shape[1:]), data)
        rest = jax.tree.map(lambda a: a[full * batch_size:], data)
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), head)
        spec = jax.eval_shape(core, ts, one if full else rest)[1]
        ms = jax.tree.map(lambda s: jnp.zeros((full + (tail > 0),) + s.shape, s.dtype), spec)
        i, ts, bad = jnp.zeros((), jnp.int32), ts._replace(key=key), jnp.zeros((), bool)

        def body(c):
            i, ts, ms, _ = c
            new, m = core(ts, jax.tree.map(lambda a: a[i], head))
            return i + 1, new, _put(ms, i, m), ~m.finite
        if full:
            i, ts, ms, bad = jax.lax.while_loop(
                lambda c: (c[0] < jnp.minimum(limit, full)) & ~c[3], body, (i, ts, ms, bad))
        if tail:
            go = (i == full) & (limit > full) & ~bad
            new, m = core(ts, rest)
            ts, ms = _where(go, new, ts), _put(ms, full, m)
            i, bad = i + go, bad | (go & ~m.finite)
        return ts, i, bad, ms
    return jax.jit(epoch), (batch_size,) * full + ((tail,) if tail else ())


@_cached
def _make_eval(model, loss, accuracy, n, batch_size):
    """Jitted ``(params, state, data) -> (mean loss, mean accuracy)`` in eval mode: the last
    batch padded with copies of the last example at weight 0, so every batch has one shape
    and the mean counts each of the ``n`` real examples once."""
    nb = math.ceil(n / batch_size)

    def run(params, state, data):
        idx = jnp.minimum(jnp.arange(nb * batch_size), n - 1)
        w = (jnp.arange(nb * batch_size) < n).astype(default_dtype()).reshape(nb, batch_size)
        data = jax.tree.map(lambda a: a[idx].reshape((nb, batch_size) + a.shape[1:]), data)

        def body(total, batch):
            (x, t, kw), wb = batch
            pred, _ = model.apply(params, state, x, train=False, **kw)
            s = jnp.sum(wb)
            c = jnp.sum(accuracy(pred, t) * wb) if accuracy else jnp.zeros(())
            return (total[0] + loss(pred, t, weights=wb) * s, total[1] + c), None
        (tot, cor), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (data, w))
        return tot / n, (cor / n if accuracy else jnp.full((), jnp.nan))
    return jax.jit(run)


def evaluate(model, loss, params, state, data, *, batch_size: int = 256, accuracy="auto"
             ) -> dict:
    """Mean loss (and accuracy) of ``model`` on ``data = (x, target[, model_kwargs])`` in eval
    mode (``train=False``), in one compiled scan. ``loss`` must take ``weights=``."""
    data, n = _as_data(data, "evaluate")
    acc = _accuracy_fn(loss, accuracy)
    lv, av = _make_eval(model, loss, acc, n, min(batch_size, n))(params, state, data)
    return {"loss": float(lv), **({"accuracy": float(av)} if acc else {})}


# --------------------------------------------------------------------------- fit

def _input_shape(x, batch_size):
    if isinstance(x, (tuple, list)):
        return tuple((batch_size,) + tuple(a.shape[1:]) for a in x)
    return (batch_size,) + tuple(x.shape[1:])


def _learning_rate(learning_rate, opt_state, step):
    """The rate of the last update: from ``learning_rate`` (float or schedule), else from an
    optax ``inject_hyperparams`` state, else NaN."""
    if callable(learning_rate):
        return float(learning_rate(max(step - 1, 0)))
    if learning_rate is not None:
        return float(learning_rate)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams")):
        if "learning_rate" in getattr(node, "hyperparams", {}):
            return float(node.hyperparams["learning_rate"])
    return float("nan")


def _epoch_logs(ms, sizes, good):
    """Example-weighted means over the first ``good`` steps of one epoch's metrics."""
    w = np.asarray(sizes[:good], np.float64)
    mean = lambda a: float(np.sum(np.asarray(a[:good], np.float64) * w) / w.sum()) if good \
        else float("nan")
    return {"loss": mean(ms.loss), "accuracy": mean(ms.accuracy),
            "grad_norm": mean(ms.grad_norm)}


class _Progress:
    """A tqdm bar over epochs with the latest metrics (``"auto"``: only on a terminal), or
    printed lines (``"lines"``: the first and last epoch and every tenth of the run), or
    nothing. ``close(reason)`` reports why training stopped early."""

    def __init__(self, progress, epochs):
        self.bar, self.lines, self.epochs, self.pending = None, progress == "lines", epochs, None
        if progress and not self.lines:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=epochs, unit="epoch", desc="fit", file=sys.stderr,
                                disable=None if progress == "auto" else False)
            except ImportError:
                self.lines = progress is True

    def update(self, logs):
        shown = {k: f"{v:.4g}" for k, v in logs.items()
                 if k not in ("epoch", "time") and not (isinstance(v, float) and math.isnan(v))}
        line = f"epoch {logs['epoch']}/{self.epochs} " + " ".join(f"{k} {v}"
                                                                 for k, v in shown.items())
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.lines:
            e = logs["epoch"]
            self.pending = line
            if e in (1, self.epochs) or e % max(1, self.epochs // 10) == 0:
                print(line, flush=True)
                self.pending = None

    def close(self, reason=None):
        if self.bar is not None:
            self.bar.close()
            if reason and not self.bar.disable:
                print(reason, file=sys.stderr)
        elif self.lines:
            for text in (self.pending, reason):
                if text:
                    print(text, flush=True)


class _EarlyStop:
    """Early stopping on ``monitor`` with :func:`fnn.regularizers.early_stopping` (a pure,
    jittable rule); watches ``(params, state)`` so that the best of both can be restored."""

    def __init__(self, rule, min_delta, monitor, ts):
        if isinstance(rule, int):
            from fnn.regularizers import early_stopping
            rule = early_stopping(rule, min_delta)
        self.update, self.monitor = jax.jit(rule.update), monitor
        self.state = rule.init((ts.params, ts.state))

    def __call__(self, epoch, ts, logs):
        """Feed one epoch; return the reason to stop, or ``None``."""
        if self.monitor not in logs:
            raise ValueError(f"fit: cannot monitor {self.monitor!r}; this run logs "
                             f"{sorted(logs)}")
        value = logs[self.monitor] * (-1 if self.monitor.endswith("accuracy") else 1)
        self.state = self.update(self.state, value, (ts.params, ts.state))
        if bool(self.state.stop):
            return (f"fit: early stopping after epoch {epoch}: {self.monitor} has not improved "
                    f"for {int(self.state.wait)} epochs")
        return None

    def finish(self, ts, restore):
        """``(train_state, best epoch)``, with the best params and state if ``restore``."""
        if restore and int(self.state.step) > 0:
            p, s = self.state.best_params
            ts = ts._replace(params=p, state=s)
        return ts, int(self.state.best_step) + 1


def _nonfinite_message(epoch, step, start):
    return (f"fit: non-finite loss or gradient at epoch {epoch}, step {step} (update "
            f"{step - start + 1} of the epoch); training stopped, keeping the state from "
            f"before that step")


def fit(model, loss, optimizer, train_data, *, epochs: int, batch_size: int, val_data=None,
        key=None, params=None, state=None, train_state: TrainState | None = None,
        grad: str | Callable = "autodiff", accuracy="auto", regularizer=None, learning_rate=None,
        shuffle: bool = True, drop_last: bool = False, early_stopping=None,
        min_delta: float = 0.0, monitor: str | None = None, restore_best: bool = True,
        callbacks=(), on_nonfinite: str = "stop", progress="auto", grad_norm: bool = True,
        eval_batch_size: int = 512) -> FitResult:
    """Train ``model`` on ``train_data = (x, target[, model_kwargs])`` for ``epochs`` epochs.

    Each epoch is one compiled call (see the module docstring); the first compiles, the rest
    reuse it. After each epoch: validation loss/accuracy on ``val_data`` (eval mode, one
    compiled scan), a row of ``history``, the progress bar, ``callbacks`` (each
    ``cb(epoch, train_state, logs)``; returning ``True`` stops), early stopping.

    **Arguments:** ``optimizer``: any optax-shaped ``(init, update)`` pair. Start from
    ``key`` (with ``params``/``state`` or ``model.init``) or from ``train_state``. ``grad``:
    ``"autodiff"``, ``"manual"`` (hand-derived backprop) or a gradient function (see
    :func:`make_step`). ``accuracy``: ``"auto"``, ``None`` or
    ``fn(pred, target) -> [batch]``. ``regularizer``: a ``fnn.regularizers.Regularizer`` added
    to the objective (history shows the data loss). ``learning_rate`` (float or schedule) is
    only recorded in the history. ``early_stopping``: a patience (int) or a
    ``fnn.regularizers.early_stopping(...)`` pair, watching ``monitor`` (``"val_loss"`` when
    there is validation data, else ``"loss"``; names ending in ``accuracy`` are maximised);
    with ``restore_best`` the best epoch's params and state are returned.
    ``on_nonfinite``: ``"stop"`` (warn and return) or ``"raise"`` (``FloatingPointError``).
    ``progress``: ``"auto"`` (a tqdm bar on a terminal), ``True``, ``"lines"``, ``False``.
    ``grad_norm=False``: skip the gradient norm (NaN in the history; see :func:`make_step`).
    """
    if on_nonfinite not in ("stop", "raise"):
        raise ValueError(f"fit: on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    data, n = _as_data(train_data, "fit: train_data")
    if train_state is not None and (params is not None or state is not None):
        raise ValueError("fit: pass params/state or train_state, not both")
    if train_state is None:
        if key is None:
            raise ValueError("fit: pass key= (a jax.random key) or train_state=")
        train_state = create_train_state(model, optimizer, key,
                                         _input_shape(data[0], min(batch_size, n)),
                                         params=params, state=state)
    acc = _accuracy_fn(loss, accuracy)
    run_epoch, sizes = _make_epoch(model, loss, optimizer, grad, acc, regularizer, grad_norm,
                                   n, batch_size, drop_last, shuffle)
    val = _as_data(val_data, "fit: val_data") if val_data is not None else None
    run_eval = val and _make_eval(model, loss, acc, val[1], min(eval_batch_size, val[1]))
    stopper = None if early_stopping is None else _EarlyStop(
        early_stopping, min_delta, monitor or ("val_loss" if val else "loss"), train_state)
    history, reason, bar = {}, None, _Progress(progress, epochs)
    try:
        for epoch in range(1, epochs + 1):
            t0, start, before = time.perf_counter(), int(train_state.step), train_state
            train_state, steps, bad, ms = run_epoch(before, data, np.int32(len(sizes)))
            good = int(steps) - bool(bad)
            if bool(bad):                   # replay up to the bad step: the last good state
                train_state = run_epoch(before, data, np.int32(good))[0]
            logs = {"epoch": epoch, **_epoch_logs(jax.device_get(ms), sizes, good)}
            if run_eval:
                vl, va = run_eval(train_state.params, train_state.state, val[0])
                logs.update(val_loss=float(vl), val_accuracy=float(va))
            if acc is None:
                logs = {k: v for k, v in logs.items() if not k.endswith("accuracy")}
            logs.update(lr=_learning_rate(learning_rate, train_state.opt_state,
                                          int(train_state.step)),
                        time=time.perf_counter() - t0)
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            bar.update(logs)
            if bool(bad):
                reason = _nonfinite_message(epoch, start + good, start)
            elif any([cb(epoch, train_state, logs) for cb in callbacks]):   # call every one
                reason = f"fit: a callback stopped training after epoch {epoch}"
            elif stopper:
                reason = stopper(epoch, train_state, logs)
            if reason:
                break
    finally:
        bar.close(reason)
    best = None
    if stopper:
        train_state, best = stopper.finish(train_state, restore_best)
    if reason and reason.startswith("fit: non-finite"):
        if on_nonfinite == "raise":
            raise FloatingPointError(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return FitResult(train_state, history, reason, best)


# --------------------------------------------------------------------------- LR finder

class LRFindResult(NamedTuple):
    """``lrs`` and ``losses`` of the sweep (up to where it stopped), ``suggestion`` (a tenth of
    the rate at the lowest smoothed loss) and ``diverged`` (the 4×-best rule fired)."""

    lrs: np.ndarray
    losses: np.ndarray
    suggestion: float
    diverged: bool

    def plot(self, path):
        """Loss against learning rate (log axis) to ``path`` (see :func:`fnn.plot.lr_finder`)."""
        from fnn import plot
        return plot.lr_finder(self, path)


def _smooth(losses, beta=0.98):
    """Bias-corrected exponential moving average, as fastai's LR finder."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out)


def lr_find(model, loss, make_optimizer: Callable, train_data, *, batch_size: int, key,
            min_lr: float = 1e-7, max_lr: float = 10.0, steps: int = 100, params=None,
            state=None, grad: str | Callable = "autodiff", divergence: float = 4.0, plot=None
            ) -> LRFindResult:
    """LR range test: train from ``min_lr`` upward by a constant factor per step up to
    ``max_lr``; stop when the loss exceeds ``divergence`` (4) times its best so far or turns
    non-finite; suggest a rate a tenth of the one at the lowest smoothed loss.

    ``lr_t = min_lr·(max_lr/min_lr)^(t/(steps-1))``. ``make_optimizer(schedule)`` builds the
    optimizer from a schedule ``step -> rate`` (``lambda lr: fnn.optim.adam(lr)``). All
    ``steps`` run as one compiled scan over shuffled minibatches (reshuffled after each pass);
    ``plot=path`` writes loss against rate (log axis) as a PNG. Params are not changed.
    """
    if hasattr(make_optimizer, "init") or not callable(make_optimizer):
        raise TypeError("lr_find: make_optimizer must be a function schedule -> optimizer "
                        f"(e.g. lambda lr: fnn.optim.sgd(lr)), got {make_optimizer!r}")
    if not 0 < min_lr < max_lr or steps < 2:
        raise ValueError(f"lr_find: need 0 < min_lr < max_lr and steps >= 2, got min_lr="
                         f"{min_lr}, max_lr={max_lr}, steps={steps}")
    data, n = _as_data(train_data, "lr_find: train_data")
    if batch_size > n:
        raise ValueError(f"lr_find: batch_size {batch_size} exceeds the {n} examples")
    ratio = (max_lr / min_lr) ** (1.0 / (steps - 1))
    optimizer = make_optimizer(lambda count: min_lr * ratio ** count)
    k_init, k_data = jax.random.split(key)
    ts = create_train_state(model, optimizer, k_init, _input_shape(data[0], batch_size),
                            params=params, state=state)
    passes = math.ceil(steps * batch_size / n)
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(k_data, p), n)
                             for p in range(passes)])[:steps * batch_size]
    core = _step_core(model, loss, optimizer, grad)

    @jax.jit
    def sweep(ts, data, idx):       # steps after a non-finite loss are cut off below
        return jax.lax.scan(lambda t, i: core(t, jax.tree.map(lambda a: a[i], data)), ts,
                            idx)[1].loss
    losses = np.asarray(sweep(ts, data, order.reshape(steps, batch_size)), np.float64)
    lrs = min_lr * ratio ** np.arange(steps)
    best = np.minimum.accumulate(np.where(np.isfinite(losses), losses, np.inf))
    bad = ~np.isfinite(losses) | (losses > divergence * best)
    stop = int(np.argmax(bad)) if bad.any() else steps - 1
    lrs, losses = lrs[:stop + 1], losses[:stop + 1]
    finite = np.isfinite(losses)
    smooth = _smooth(losses[finite])
    suggestion = float(lrs[finite][int(np.argmin(smooth))] / 10) if finite.any() else min_lr
    result = LRFindResult(lrs, losses, suggestion, bool(bad.any()))
    if plot:
        result.plot(plot)
    return result
