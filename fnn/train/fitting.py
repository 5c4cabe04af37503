"""``fit``: epochs, validation, history, progress, callbacks, early stopping and resume."""
from __future__ import annotations

import collections
import itertools
import math
import time
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn.precision import loss_scaling, mixed_precision, policy
from fnn.sharding.mesh import current_mesh
from fnn.train import resume as _resume
from fnn.train.callbacks import _EarlyStop
from fnn.train.epoch import make_chunk, make_epoch, make_eval
from fnn.train.distributed import gathered, is_writer, on_mesh as _on_mesh, place, to_host
from fnn.train.loops import (batch_inputs_finite, copy_state, logs_from_sums, memory_finish,
                             memory_launch, stream_epoch, stream_eval)
from fnn.train.metrics import resolve_metrics
from fnn.train.progress import _Progress
from fnn.train.step import TrainState, _as_data, _unpack, create_train_state
from fnn.train.streaming import epoch_batches, is_stream
from fnn.train.validate import make_check

__all__ = ["FitResult", "fit"]


class FitResult(NamedTuple):
    """``train_state`` after training; ``history``: per-epoch lists (``epoch``, ``loss``, each
    metric, ``val_loss`` and ``val_<metric>``, ``lr``, ``grad_norm`` when computed, ``time``);
    ``stop_reason``: ``None`` if all epochs ran; ``best_epoch`` (1-based) with early stopping."""

    train_state: TrainState
    history: dict
    stop_reason: str | None = None
    best_epoch: int | None = None


def _input_shape(x, batch_size):
    if isinstance(x, (tuple, list)):
        return tuple((batch_size,) + tuple(np.shape(a)[1:]) for a in x)
    return (batch_size,) + tuple(np.shape(x)[1:])


def _learning_rate(learning_rate, in_state, step):
    """The rate of the last update: from ``learning_rate`` (float or schedule), else the one in
    the optimizer state (fnn's optimizers, ``optax.inject_hyperparams``; NaN if none), read
    with the epoch's report."""
    if callable(learning_rate):
        return float(learning_rate(max(step - 1, 0)))
    if learning_rate is not None:
        return float(learning_rate)
    return in_state


def _nonfinite_message(epoch, bad, start):
    cause = ("the inputs of that batch are finite, so the model or the optimizer diverged "
             "(lower the learning rate, clip the gradients)") if bad.inputs_finite else \
        ("the inputs of that batch hold NaN or Inf: a data problem, not the model")
    kept = "keeping the state from before that step" if bad.params_finite else (
        "but the parameters were already non-finite before it (a non-finite gradient or "
        "update with a finite loss, in an earlier epoch or, with grad_norm=True, an earlier "
        "step; fit(grad_norm=True) stops at a non-finite gradient)")
    return (f"fit: non-finite loss or gradient at epoch {epoch}, step {bad.step} (update "
            f"{bad.step - start + 1} of the epoch); {cause}; training stopped, {kept}")


def _check_args(epochs, batch_size, on_nonfinite, stream, resume, checkpoint_dir):
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if on_nonfinite not in ("stop", "raise"):
        raise ValueError(f"fit: on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
    if not stream and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs checkpoint_dir=")


def _first_batch(source, epoch, steps_per_epoch):
    """The first batch of ``epoch`` and the epoch's iterator with it put back."""
    it = epoch_batches(source, epoch, steps_per_epoch)
    first = next(it, None)
    if first is None:
        raise ValueError("fit: the training data gave no batch")
    return _unpack(first, "fit: train_data"), itertools.chain([first], it)


def _run_epoch(ctx, epoch, ts, pending, remaining):
    """One epoch's ``(train_state, Report or None, Bad | None)`` (in memory or streamed).

    In memory, epochs are launched ahead: the next one before this one's bookkeeping
    (:func:`_speculate`), or, when nothing reads the state between epochs (no validation,
    callbacks, early stopping or checkpoints), a chain of ``ctx["chain"]`` epochs (about a
    quarter second of work, see :func:`_chain_length`) read back after one wait (on XLA:CPU
    each wait costs about as much as a millisecond of work).
    Launched epochs are used only if the next epoch starts from the state they started from."""
    if ctx["stream"]:
        batches = pending or epoch_batches(ctx["data"], epoch, ctx["steps_per_epoch"])
        return stream_epoch(ctx["run"], ts, batches, ctx["chunk"], ctx["check"],
                            "fit: train_data")
    q, args = ctx["inflight"], (ctx["run"], ctx["sizes"])
    if q and q[0].before is not ts:
        q.clear()
    if not q:
        t0, last, limit = time.perf_counter(), ts, ctx["limit"]
        for _ in range(max(1, min(ctx["chain"], remaining))):
            q.append(memory_launch(*args, last, ctx["data"], limit, keep=ctx["keep"]))
            last, limit = q[-1].ts, q[-1].nxt
        jax.block_until_ready(q[-1].flat)
        per = (time.perf_counter() - t0) / len(q)
        if len(q) > 1:
            ctx["epoch_time"] = per
        if ctx["quiet"]:
            ctx["chain"] = _chain_length(per, ctx["state_bytes"])
    out = memory_finish(*args, q.popleft(), ctx["data"], ctx["bad_inputs"],
                        q[-1] if q else None)
    if out[2] is not None:
        q.clear()
    return out


def _chain_length(seconds_per_epoch, state_bytes, most=64, seconds=0.25, memory=2 ** 26):
    """Epochs per chain: about ``seconds`` of work (the display stays live), at most ``most``,
    and the chain's states (two per epoch) within ``memory`` bytes."""
    by_time = int(seconds / max(seconds_per_epoch, 1e-6))
    by_memory = int(memory // max(2 * state_bytes, 1))
    return max(1, min(most, by_time, by_memory))


def _speculate(ctx, ts):
    """Launch the next in-memory epoch before this one's bookkeeping (validation read-back,
    history, callbacks), so the device does not wait for the host. The epoch donates its
    input and the bookkeeping reads ``ts``: it runs from a copy, made only for a small state
    (``ctx["speculate"]``); a large one is worth its memory more than the overlap."""
    if not ctx["stream"] and not ctx["inflight"] and ctx["chain"] == 1 and ctx["speculate"]:
        ctx["inflight"].append(memory_launch(ctx["run"], ctx["sizes"], ts, ctx["data"],
                                             ctx["limit"], copy=True))


def _validate(ctx, ts, before_read=lambda: None):
    """Validation logs; ``before_read`` runs once the in-memory evaluation is dispatched."""
    val = ctx["val"]
    if val is None:
        before_read()
        return {}
    if ctx["val_stream"]:
        before_read()
        return stream_eval(ctx["model"], ctx["loss"], ctx["metrics"], ts.params, ts.state,
                           epoch_batches(val, 1, None), ctx["check"], "fit: val_data")
    vl, results = ctx["run_eval"](ts.params, ts.state, val[0])
    before_read()
    return {"val_loss": float(vl),
            **{"val_" + m.name: float(r) for m, r in zip(ctx["metrics"], results)}}


def _callbacks(callbacks, epoch, ts, logs):
    """Call every callback; ``(train_state, stop reason or None)``."""
    reason = None
    for cb in callbacks:
        out = cb(epoch, ts, logs)
        if isinstance(out, TrainState):
            ts = out
        elif isinstance(out, str):
            reason = reason or out
        elif out is True:
            reason = reason or f"fit: a callback stopped training after epoch {epoch}"
    return ts, reason


def _with_precision(model, optimizer, precision, loss_scale):
    """The model under ``precision`` and the optimizer with the loss scaling asked for."""
    if precision is None:
        if loss_scale not in ("auto", None):
            raise ValueError("fit: loss_scale needs precision= (a float16 or bfloat16 policy)")
        return model, optimizer
    p = policy(precision)
    if loss_scale == "auto":
        loss_scale = "dynamic" if p.compute == jnp.float16 else None
    if loss_scale is None or loss_scale is False:
        return mixed_precision(model, p), optimizer
    if loss_scale == "dynamic":
        return mixed_precision(model, p), loss_scaling(optimizer)
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) \
            or not loss_scale > 0:
        raise ValueError(f"fit: loss_scale must be 'auto', 'dynamic', a positive number or None, "
                         f"got {loss_scale!r}")
    return mixed_precision(model, p), loss_scaling(optimizer, initial=float(loss_scale),
                                                   dynamic=False)


def fit(model, loss, optimizer, train_data, *, epochs: int, batch_size: int | None = None,
        val_data=None, key=None, params=None, state=None, train_state: TrainState | None = None,
        grad: str | Callable = "autodiff", accuracy="auto", metrics=(), regularizer=None,
        augment: Callable | None = None, learning_rate=None, shuffle: bool = True,
        drop_last: bool = False, early_stopping=None, min_delta: float = 0.0,
        monitor: str | None = None, restore_best: bool = True, callbacks=(),
        on_nonfinite: str = "stop", progress="auto", grad_norm: bool = False,
        eval_batch_size: int = 512, steps_per_epoch: int | None = None, chunk: int = 32,
        check_data: bool = True, checkpoint_dir=None, resume: bool = False, precision=None,
        loss_scale="auto", mesh=None, param_sharding=None) -> FitResult:
    """Train ``model`` on ``train_data`` for ``epochs`` epochs; returns a :class:`FitResult`.

    ``train_data``: ``(x, target[, model_kwargs])`` arrays in memory (each epoch one compiled
    call: shuffle, the full batches of ``batch_size``, the partial one unless ``drop_last``),
    or a stream of such batches (an iterable, or ``epoch -> iterable``; prefetched and run in
    compiled chunks of ``chunk`` steps, at most ``steps_per_epoch`` per epoch; see
    :mod:`fnn.train.streaming`). After each epoch: validation on ``val_data`` (the same two
    kinds; eval mode), a row of ``history``, the progress display, ``callbacks`` (see
    :mod:`fnn.train.callbacks`), early stopping, and with ``checkpoint_dir`` the whole run
    state saved atomically (``resume=True`` continues a run killed at any moment, bit for bit;
    see :mod:`fnn.train.resume`).

    **Arguments:** ``optimizer``: any optax-shaped ``(init, update)`` pair (fnn's keep the
    learning rate in their state: the history's ``lr`` reads it, and optimizers equal but for
    the rate share one compiled epoch). Start from ``key`` (with ``params``/``state`` or
    ``model.init``) or from ``train_state``. ``grad``: ``"autodiff"``, ``"manual"``
    (hand-derived backprop) or a gradient function (see :func:`make_step`). ``accuracy``:
    ``"auto"``, ``None`` or ``fn(pred, target) -> [batch]``; ``metrics``: more, by name
    (``"top5_accuracy"``, ``"mean_absolute_error"``, ``"macro_f1"``) or function (see
    :mod:`fnn.train.metrics`), computed inside the compiled epoch. ``regularizer``: a
    ``fnn.regularizers.Regularizer`` added to the objective (history shows the data loss).
    ``augment``: ``fn(key, x, target) -> (x, target)``, jittable, applied to each training
    batch inside the step with ``key = fold_in(train_state.key, train_state.step)``.
    ``learning_rate`` (float or schedule) overrides the rate recorded in the history.
    ``early_stopping``: a patience (int) or a ``fnn.regularizers.early_stopping(...)`` pair
    watching ``monitor`` (``"val_loss"`` with validation data, else ``"loss"``; names ending
    in ``accuracy`` or ``f1`` are maximised); with ``restore_best`` the best epoch's params
    and state are returned. ``on_nonfinite``: ``"stop"`` (warn and return) or ``"raise"``
    (``FloatingPointError``); the message says whether that batch's inputs were finite.
    ``check_data``: before training (each streamed batch as it comes, on the host), refuse
    non-finite inputs, integer labels outside the model's classes and token ids outside an
    ``Embedding``'s vocabulary (:func:`fnn.checks.data_checker`). ``progress``: ``"auto"``
    (a tqdm bar on a terminal), ``True``, ``"lines"``, ``False``. ``grad_norm=True``: the mean
    gradient norm per epoch in the history (one more pass over the gradients per step) and a
    non-finite gradient stops training too.
    ``precision``: a :mod:`fnn.precision` policy (``"bfloat16"``, ``"float16"``,
    ``"params=float32,compute=bfloat16,output=float32"``): the model runs as
    ``mixed_precision(model, precision)``, master weights and optimizer state stay in the
    policy's params dtype. ``loss_scale``: ``"auto"`` (dynamic for float16 compute, none
    otherwise), ``"dynamic"``, a number (a static scale), or ``None``; the optimizer is wrapped
    in :func:`fnn.precision.loss_scaling`, a non-finite step is skipped and the scale after each
    epoch is the history's ``loss_scale`` column. bfloat16 has float32's range and needs no
    scaling, but may be given one.
    ``mesh``: a ``jax.sharding.Mesh`` with a ``"data"`` axis (default: the one set with
    :func:`fnn.sharding.default_mesh`): data parallel, each batch split over ``"data"``, the
    shuffle within each device's shard, the epoch still one compiled call. ``param_sharding``:
    rules for the parameters (:func:`fnn.sharding.fsdp`, :func:`fnn.sharding.tensor_parallel`,
    a list of ``(regex, PartitionSpec)``); optimizer state follows its parameters. In-memory
    data only; the batch size must be a multiple of the data axis, and when the example count
    is not, the last ``n % devices`` examples are left out (with a warning). A mesh spanning
    processes (``jax.distributed``): every process passes the same arrays, process 0 alone
    writes progress and the resume file, and each gets the final train state whole on its
    first local device (see ``docs/scaling.md``).

    Example::

        result = fit(model, losses.softmax_cross_entropy_with_integer_labels, optim.adam(1e-3),
                     (x, y), epochs=20, batch_size=32, val_data=(xv, yv),
                     key=jax.random.PRNGKey(0), metrics=["macro_f1"], early_stopping=5)
    """
    stream = is_stream(train_data)
    _check_args(epochs, batch_size, on_nonfinite, stream, resume, checkpoint_dir)
    if precision is not None and callable(grad):
        raise ValueError("fit: precision= needs grad='autodiff' or 'manual'; a gradient "
                         "function computes with the model it was built from, not the "
                         "mixed-precision one")
    model, optimizer = _with_precision(model, optimizer, precision, loss_scale)
    ms = resolve_metrics(loss, accuracy, metrics)
    ctx = dict(stream=stream, model=model, loss=loss, metrics=ms, check=None,
               shuffle=shuffle, steps_per_epoch=steps_per_epoch, chunk=chunk, data=train_data)
    pending = None
    if stream:
        first, pending = _first_batch(train_data, 1, steps_per_epoch)
        shape_batch = jax.tree.leaves(first[0])[0].shape[0]
        x0 = first[0]
        ctx["run"] = make_chunk(model, loss, optimizer.update, grad, ms, regularizer, grad_norm,
                                augment)
        if check_data:
            ctx["check"] = make_check(model, loss, _input_shape(x0, shape_batch))
    else:
        raw = _unpack(train_data, "fit: train_data")           # checked on the host, as given
        data, n = _as_data(train_data, "fit: train_data")
        ctx["data"], x0, shape_batch = data, data[0], min(batch_size, n)
        if check_data:
            ctx["check"] = make_check(model, loss, _input_shape(x0, shape_batch))
            ctx["check"](raw, "fit: train_data")
        ctx["run"], ctx["sizes"] = run, sizes = make_epoch(model, loss, optimizer.update, grad, ms,
                                              regularizer, grad_norm, augment, n, batch_size,
                                              drop_last, shuffle)
        ctx["limit"] = jax.device_put(np.int32(len(sizes)))
    if train_state is not None and (params is not None or state is not None):
        raise ValueError("fit: pass params/state or train_state, not both")
    if train_state is None:
        if key is None:
            raise ValueError("fit: pass key= (a jax.random key) or train_state=")
        train_state = create_train_state(model, optimizer, key, _input_shape(x0, shape_batch),
                                         params=params, state=state)
    if not stream:          # the epoch donates its input: never the caller's own arrays
        train_state = copy_state(train_state)
        ctx.update(place=lambda t: t, bad_inputs=batch_inputs_finite(ctx["data"], ctx["sizes"],
                                                                      shuffle))
    mesh = current_mesh() if mesh is None else mesh
    if mesh is not None:
        train_state = _on_mesh(ctx, mesh, param_sharding, train_state, (
            model, loss, optimizer.update, grad, ms, regularizer, grad_norm, augment, n,
            batch_size, drop_last, shuffle))
    elif param_sharding is not None:
        raise ValueError("fit: param_sharding= needs mesh= (a jax.sharding.Mesh)")
    ctx["val_stream"] = val_data is not None and is_stream(val_data)
    ctx["val"] = val = val_data if ctx["val_stream"] else (
        _as_data(val_data, "fit: val_data") if val_data is not None else None)
    if val is not None and not ctx["val_stream"] and mesh is not None:
        rep = jax.sharding.NamedSharding(jax.tree.leaves(train_state)[0].sharding.mesh,
                                         jax.sharding.PartitionSpec())
        val = ctx["val"] = (place(val[0], jax.tree.map(lambda _: rep, val[0])), val[1])
    if val is not None and not ctx["val_stream"]:
        if check_data:
            ctx["check"](_unpack(val_data, "fit: val_data"), "fit: val_data")
        ctx["run_eval"] = make_eval(model, loss, ms, val[1], min(eval_batch_size, val[1]))
    stopper = None if early_stopping is None else _EarlyStop(
        early_stopping, min_delta, monitor or ("val_loss" if val is not None else "loss"),
        train_state)
    result = _train(ctx, train_state, stopper, epochs, callbacks, learning_rate, grad_norm,
                    progress, on_nonfinite, restore_best, checkpoint_dir, resume, pending)
    if mesh is not None and jax.process_count() > 1:   # every process gets the whole state
        result = result._replace(train_state=gathered(result.train_state))
    return result


def _train(ctx, ts, stopper, epochs, callbacks, learning_rate, grad_norm, progress,
           on_nonfinite, restore_best, checkpoint_dir, resume, pending):
    history, reason, done = {}, None, 0
    quiet = not (callbacks or stopper or checkpoint_dir is not None or ctx["val"] is not None)
    ctx.update(inflight=collections.deque(), chain=1, quiet=quiet, state_bytes=sum(
        np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(ts)
        if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)))
    # a replay source only where the guard may see a NaN gradient a step late
    ctx.update(keep=not grad_norm, speculate=ctx["state_bytes"] <= 2 ** 26)
    if resume and (saved := _resume.load_run(checkpoint_dir, ts, stopper and stopper.state)):
        ts, es, info = saved
        ts = ctx["place"](ts) if "place" in ctx else ts
        if stopper:
            stopper.state = es
        done, history, reason = info["epoch"], info["history"], info["stop_reason"]
        _resume.restore_callbacks(callbacks, info["callbacks"])
        pending = None                          # the first batch peeked was epoch 1's
    bar = _Progress(progress if is_writer() else False, epochs, initial=done)
    step = int(to_host(ts.step))
    try:
        for epoch in range(done + 1, epochs + 1):
            if reason:
                break
            t0, start = time.perf_counter(), step       # the step count, kept on the host
            ts, report, bad = _run_epoch(ctx, epoch, ts, pending if epoch == 1 else None,
                                         epochs - epoch + 1)
            if report is None:
                reason = f"fit: the training data ran out before epoch {epoch}"
                break
            ahead = (lambda: _speculate(ctx, ts)) if bad is None and epoch < epochs else \
                (lambda: None)
            logs = {"epoch": epoch, **logs_from_sums(report.sums, ctx["metrics"], grad_norm),
                    **_validate(ctx, ts, ahead)}
            step = start + report.steps
            logs.update(lr=_learning_rate(learning_rate, report.learning_rate, step),
                        time=ctx.pop("epoch_time", time.perf_counter() - t0))
            if not math.isnan(report.loss_scale):
                logs["loss_scale"] = report.loss_scale
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            bar.update(logs)
            if bad is not None:
                reason = _nonfinite_message(epoch, bad, start)
            else:
                ts, reason = _callbacks(callbacks, epoch, ts, logs)
                if not reason and stopper:
                    reason = stopper(epoch, ts, logs)
            if checkpoint_dir is not None:      # gathered by all, written by process 0
                saved = to_host((ts, stopper and stopper.state))
                if is_writer():
                    _resume.save_run(checkpoint_dir, *saved, epoch, history, callbacks, reason)
    finally:
        bar.close(reason)
    best = None
    if stopper:
        ts, best = stopper.finish(ts, restore_best)
    if reason and reason.startswith("fit: non-finite"):
        if on_nonfinite == "raise":
            raise FloatingPointError(reason)
        if is_writer():
            warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return FitResult(ts, history, reason, best)
