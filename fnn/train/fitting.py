"""``fit``: the data made into epochs, the train state, validation, and the loop over epochs
with the history, the progress display, callbacks, early stopping and backup."""
from __future__ import annotations

import itertools
import math
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn.optim import learning_rate, set_learning_rate
from fnn.optim.rates import rate_nodes
from fnn.precision import loss_scaling, mixed_precision, policy
from fnn.sharding.distribution import Distribution
from fnn.sharding.mesh import current_mesh
from fnn.train import resume as backup_file
from fnn.train._batches import as_data, input_shape, unpack
from fnn.train._removed import refuse_removed
from fnn.train.callbacks import EarlyStopping, ReduceLROnPlateau
from fnn.train.data_checks import make_data_check
from fnn.train.distributed import (gathered, is_writer, memory_on_mesh, on_mesh, place,
                                   stream_on_mesh, to_host)
from fnn.train.epoch import DONATE, KEEP, make_chunk_runner, make_epoch_runner, make_eval
from fnn.train.loops import InMemory, Streamed, batch_inputs_finite, copy_state, logs_from_sums
from fnn.train.validation import InMemoryVal, StreamedVal
from fnn.train.metrics import resolve_metrics
from fnn.train.options import Loop, Step
from fnn.train.progress import Progress, shows_steps
from fnn.train.resume import BackupAndRestore
from fnn.train.step import TrainState, create_train_state
from fnn.train.streaming import epoch_batches, is_stream

__all__ = ["FitResult", "fit"]


class FitResult(NamedTuple):
    """``train_state`` after training; ``history``: per-epoch lists (``epoch``, ``loss``, each
    metric, ``val_loss`` and ``val_<metric>``, ``lr``, ``grad_norm`` when computed,
    ``loss_scale`` with loss scaling, ``time``); ``stop_reason``: ``None`` if all epochs ran;
    ``best_epoch`` (1-based) with :class:`~fnn.train.EarlyStopping`."""

    train_state: TrainState
    history: dict
    stop_reason: str | None = None
    best_epoch: int | None = None


class StepParts(NamedTuple):
    """What the compiled step is built from (the leading arguments of the epoch and chunk
    runners, in their order)."""

    model: object
    loss: object
    update: object
    grad: object
    metrics: tuple
    regularizer: object
    grad_norm: bool
    augment: object


class Run(NamedTuple):
    """A prepared run: its ``epochs`` source (:class:`~fnn.train.loops.InMemory` or
    :class:`~fnn.train.loops.Streamed`), ``val`` (or ``None``), the ``metrics``, the
    ``callbacks`` without the backup, the ``stopper`` and ``backup`` found among them, the
    ``loop`` options, whether the history has a ``grad_norm`` and ``place`` for a restored
    state."""

    epochs: object
    val: object
    metrics: tuple
    callbacks: tuple
    stopper: EarlyStopping | None
    backup: BackupAndRestore | None
    loop: Loop
    grad_norm: bool
    place: object


def _nonfinite_message(epoch, bad, start):
    cause = ("the inputs of that batch are finite, so the model or the optimizer diverged "
             "(lower the learning rate, clip the gradients)") if bad.inputs_finite else \
        ("the inputs of that batch hold NaN or Inf: a data problem, not the model")
    kept = "keeping the state from before that step" if bad.params_finite else (
        "but the parameters were already non-finite before it (an update that overflowed "
        "with a finite loss and gradient, or a train state given with non-finite values)")
    return (f"fit: non-finite loss or gradient at epoch {epoch}, step {bad.step} (update "
            f"{bad.step - start + 1} of the epoch); {cause}; training stopped, {kept}")


def _check_args(epochs, batch_size, stream, step, loop, distribution):
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if not stream and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                       or batch_size < 1):
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    for name, value, kind in (("step", step, Step), ("loop", loop, Loop),
                              ("distribution", distribution, Distribution)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"fit: {name} must be a fnn.{kind.__module__.split('.')[1]}."
                            f"{kind.__name__}(...), got {type(value).__name__}")


def _with_precision(model, optimizer, precision, grad):
    """The model under ``precision``, the optimizer with dynamic loss scaling for float16."""
    if precision is None:
        return model, optimizer
    if callable(grad):
        raise ValueError("fit: precision= needs grad='autodiff' or 'manual'; a gradient "
                         "function computes with the model it was built from, not the "
                         "mixed-precision one")
    p = policy(precision)
    return mixed_precision(model, p), (loss_scaling(optimizer) if p.compute == jnp.float16
                                       else optimizer)


_ADJUSTABLE = ("build the optimizer with its rate in its state: "
               "optax.inject_hyperparams(optax.adam)(learning_rate=0.3), or fnn.optim.adam(0.3)")


def _check_rate(opt_state, callbacks):
    """Refuse a :class:`ReduceLROnPlateau` that could not change the rate (before training,
    not at the first plateau); warn that the history's ``lr`` is NaN when the state holds no
    rate."""
    if not rate_nodes(opt_state):
        if any(isinstance(cb, ReduceLROnPlateau) for cb in callbacks):
            raise ValueError("fit: ReduceLROnPlateau needs a learning rate it can change, and "
                             "this optimizer's state holds none (a plain optax optimizer such "
                             f"as optax.adam(0.3) keeps it in a closure); {_ADJUSTABLE}")
        if is_writer():
            warnings.warn("fit: this optimizer's state holds no learning rate (a plain optax "
                          "optimizer), so the history's lr is NaN; to have it recorded, "
                          + _ADJUSTABLE, UserWarning, stacklevel=4)
        return
    for cb in callbacks:
        if isinstance(cb, ReduceLROnPlateau):
            try:
                set_learning_rate(opt_state, learning_rate(opt_state))
            except ValueError as e:
                raise ValueError(f"fit: ReduceLROnPlateau cannot change this optimizer's "
                                 f"rate: {e}") from None


def _split_callbacks(callbacks):
    callbacks = tuple(callbacks)
    backups = [cb for cb in callbacks if isinstance(cb, BackupAndRestore)]
    stoppers = [cb for cb in callbacks if isinstance(cb, EarlyStopping)]
    if len(backups) > 1 or len(stoppers) > 1:
        raise ValueError("fit: callbacks hold more than one "
                         f"{'BackupAndRestore' if len(backups) > 1 else 'EarlyStopping'}")
    return (tuple(cb for cb in callbacks if not isinstance(cb, BackupAndRestore)),
            stoppers[0] if stoppers else None, backups[0] if backups else None)


@refuse_removed
def fit(model, loss, optimizer, train_data, *, epochs, batch_size=None, val_data=None,
        key=None, train_state=None, metrics="auto", callbacks=(), step=Step(), loop=Loop(),
        precision=None, distribution=None) -> FitResult:
    """Train ``model`` on ``train_data`` for ``epochs`` epochs; returns a :class:`FitResult`.

    ``train_data``: ``(x, target[, model_kwargs])`` arrays in memory (each epoch one compiled
    call: shuffle, the full batches of ``batch_size``, the partial one unless
    ``loop.drop_last``), or a stream of such batches (an iterable, or ``epoch -> iterable``;
    prefetched and run in compiled chunks, see :mod:`fnn.train.streaming`). After each epoch:
    validation on ``val_data`` (the same two kinds; eval mode), a row of ``history``, the
    progress display and ``callbacks`` in their order (:mod:`fnn.train.callbacks`:
    :class:`~fnn.train.EarlyStopping`, :class:`~fnn.train.BackupAndRestore` and the others).

    **Arguments:** ``optimizer``: any optax-shaped ``(init, update)`` pair (fnn's keep the
    learning rate in their state: the history's ``lr`` reads it, and optimizers equal but for
    the rate share one compiled epoch; a plain optax one's ``lr`` is NaN, said in one warning,
    and :class:`~fnn.train.ReduceLROnPlateau` is refused with it before training). Start from
    ``key`` (``model.init``) or from ``train_state`` (:func:`create_train_state`, e.g. with given params). ``metrics``:
    ``"auto"`` (accuracy for a classification loss), ``()``, or a list of names
    (``"accuracy"``, ``"top5_accuracy"``, ``"mean_absolute_error"``, ``"macro_f1"``),
    functions or :class:`~fnn.train.Metric` s, computed inside the compiled epoch.
    ``step``: a :class:`~fnn.train.Step` (gradient path, regularizer, augmentation, gradient
    norm); ``loop``: a :class:`~fnn.train.Loop` (shuffle, drop_last, progress, non-finite
    policy, data checks, eval batch size, steps per epoch, chunk). ``precision``: a
    :mod:`fnn.precision` policy (``"bfloat16"``, ``"float16"``, ...): short for
    ``mixed_precision(model, precision)`` and, for float16 compute, ``loss_scaling(optimizer)``
    (the history then has ``loss_scale``); for anything else use those two combinators.
    ``distribution``: a :class:`fnn.sharding.Distribution` (mesh and parameter rules; default:
    the mesh of an enclosing :func:`fnn.sharding.default_mesh`): data parallel, each batch
    split over ``"data"`` (its size a multiple of that axis); in memory, the shuffle stays
    within each device's shard and the last ``n % devices`` examples are left out (with a
    warning); streamed, each process feeds its own batches. Across processes every process
    calls ``fit`` alike, process 0 alone writes progress and backups, and each gets the final
    train state whole (see ``docs/scaling.md``).

    NaN/Inf guard: the epoch stops before the first step whose loss or gradient is not finite
    (a NaN gradient with a finite loss included; with ``Step(grad_norm=False)`` found by a
    replay of the epoch when its end state is not finite) and keeps the last finite state;
    ``fit`` warns (or raises, ``Loop(on_nonfinite="raise")``) naming the epoch, the step and
    whether that batch's inputs were finite.

    Example::

        result = fit(model, losses.softmax_cross_entropy_with_integer_labels, optim.adam(1e-3),
                     (x, y), epochs=20, batch_size=32, val_data=(xv, yv),
                     key=jax.random.PRNGKey(0), metrics=["accuracy", "macro_f1"],
                     callbacks=[EarlyStopping(5)])
    """
    stream = is_stream(train_data)
    _check_args(epochs, batch_size, stream, step, loop, distribution)
    model, optimizer = _with_precision(model, optimizer, precision, step.grad)
    ms = resolve_metrics(loss, metrics)
    parts = StepParts(model, loss, optimizer.update, step.grad, ms, step.regularizer,
                      step.grad_norm, step.augment)
    callbacks, stopper, backup = _split_callbacks(callbacks)
    if distribution is None and current_mesh() is not None:
        distribution = Distribution(current_mesh())
    check = None
    if stream:                      # the first batch: its shape makes the train state
        it = epoch_batches(train_data, 1, loop.steps_per_epoch)
        raw = next(it, None)
        if raw is None:
            raise ValueError("fit: the training data gave no batch")
        first, pending = unpack(raw, "fit: train_data"), itertools.chain([raw], it)
        x0, shape_batch = first[0], jax.tree.leaves(first[0])[0].shape[0]
    else:
        first = unpack(train_data, "fit: train_data")           # checked on the host, as given
        data, n = as_data(train_data, "fit: train_data")
        if n == 0:
            raise ValueError("fit: train_data has 0 examples")
        x0, shape_batch = data[0], min(batch_size, n)
    if loop.check_data:
        check = make_data_check(model, loss, input_shape(x0, shape_batch))
        if not stream:
            check(first, "fit: train_data")
    if train_state is None:
        if key is None:
            raise ValueError("fit: pass key= (a jax.random key) or train_state=")
        train_state = create_train_state(model, optimizer, key, input_shape(x0, shape_batch))
    _check_rate(train_state.opt_state, callbacks)
    on = on_mesh(distribution, train_state) if distribution is not None else None
    if on is not None:
        train_state = on.place_state(train_state)
    if stream:
        if on is None:
            # steps judged by their loss, the chunk's end state checked (a replay finds the step)
            runner, put = make_chunk_runner(*parts, KEEP, step.grad_norm), jax.device_put
            put_batch, get = jax.device_put, jax.device_get
        else:
            runner, put, put_batch = stream_on_mesh(on, first, parts)
            get = to_host
        epochs_src = Streamed(runner, train_data, loop.steps_per_epoch, loop.chunk, check, put,
                              pending)
    else:
        # with grad_norm=False the replay needs each epoch's start: the epoch does not
        # donate its input, which is that copy; else it donates (updates in place). The start
        # kept, the steps are judged by their loss alone and the epoch's end state checked
        # (strict=False): a replay with the per-step gradient check finds the step
        keep = not step.grad_norm
        # steps shown from inside: XLA:CPU then runs the epoch in the calling thread (a
        # host callback), so an epoch launched ahead of the bookkeeping is launched from a
        # helper thread (launch_thread.Pending)
        ticks = is_writer() and shows_steps(loop.progress)
        if on is None:
            runner, sizes = make_epoch_runner(*parts, n, batch_size, loop.drop_last,
                                              loop.shuffle, None, KEEP if keep else DONATE,
                                              ticks, not keep)
            limit = jax.device_put(np.int32(len(sizes)))
            bad_inputs = batch_inputs_finite(data, sizes, loop.shuffle)
        else:
            runner, sizes, data, limit, bad_inputs = memory_on_mesh(
                on, data, parts, batch_size, loop.drop_last, loop.shuffle, donate=not keep)
        if runner.donates:              # never the caller's own arrays
            train_state = copy_state(train_state)
        nbytes = sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(
            train_state) if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key))
        epochs_src = InMemory(runner, sizes, data, limit, bad_inputs, keep=keep,
                              speculate=nbytes <= 2 ** 26 or not runner.donates,
                              quiet=not (
                                  callbacks or backup or val_data is not None),
                              state_bytes=nbytes, put=jax.device_put)
    val = None
    if val_data is not None and is_stream(val_data):
        val = StreamedVal(val_data, model, loss, ms, check,
                          put_batch if stream else (jax.device_put if on is None else
                                                    _replicate(on)),
                          get if stream else (jax.device_get if on is None else to_host))
    elif val_data is not None:
        vdata, vn = as_data(val_data, "fit: val_data")
        if vn == 0:
            raise ValueError("fit: val_data has 0 examples")
        if on is not None:
            vdata = _replicate(on)(vdata)
        if check:
            check(unpack(val_data, "fit: val_data"), "fit: val_data")
        val = InMemoryVal(make_eval(model, loss, ms, vn, min(loop.eval_batch_size, vn)), vdata,
                          ms)
    if stopper is not None:
        stopper.start(train_state, "val_loss" if val is not None else "loss")
    run = Run(epochs_src, val, ms, callbacks, stopper, backup, loop, step.grad_norm,
              on.place_state if on is not None else (lambda t: t))
    result = _train(run, train_state, epochs)
    if on is not None and jax.process_count() > 1:     # every process gets the whole state
        result = result._replace(train_state=gathered(result.train_state))
    return result


def _replicate(on):
    rep = jax.sharding.NamedSharding(on.mesh, jax.sharding.PartitionSpec())
    return lambda tree: place(tree, jax.tree.map(lambda _: rep, tree))


def _callbacks(callbacks, epoch, ts, logs):
    """Call every callback in order; ``(train_state, the first stop reason or None)``."""
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


def _restore(run, ts):
    """``(train_state, epochs done, history, stop reason)`` from the backup, if any."""
    b, es = run.backup, run.stopper
    if b is None or not b.resume:
        return ts, 0, {}, None
    saved = backup_file.load_run(b.directory, ts, es and es.state)
    if not saved:
        return ts, 0, {}, None
    ts, es_state, info = saved
    if es:
        es.state = es_state
    backup_file.restore_callbacks(run.callbacks, info["callbacks"])
    run.epochs.restart()                    # the first batch peeked was epoch 1's
    return run.place(ts), info["epoch"], info["history"], info["stop_reason"]


def _train(run: Run, ts, epochs):
    ts, done, history, reason = _restore(run, ts)
    sizes = getattr(run.epochs, "sizes", None)
    bar = Progress(run.loop.progress if is_writer() else False, epochs, initial=done,
                   steps=len(sizes) if sizes else run.loop.steps_per_epoch).__enter__()
    step = int(to_host(ts.step))
    try:
        for epoch in range(done + 1, epochs + 1):
            if reason:
                break
            t0, start = time.perf_counter(), step       # the step count, kept on the host
            ts, report, bad = run.epochs.run(epoch, ts, epochs - epoch + 1)
            if report is None:
                reason = f"fit: the training data ran out before epoch {epoch}"
                break
            ahead = (lambda: run.epochs.ahead(ts)) if bad is None and epoch < epochs else \
                (lambda: None)
            logs = {"epoch": epoch, **logs_from_sums(report.sums, run.metrics, run.grad_norm)}
            if run.val is not None:
                logs.update(run.val.logs(ts, ahead))
            else:
                ahead()
            step = start + report.steps
            took = run.epochs.take_time()
            logs.update(lr=report.learning_rate,            # from the optimizer state
                        time=took if took is not None else time.perf_counter() - t0)
            if not math.isnan(report.loss_scale):
                logs["loss_scale"] = report.loss_scale
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            bar.update(logs)
            if bad is not None:
                reason = _nonfinite_message(epoch, bad, start)
            else:
                ts, reason = _callbacks(run.callbacks, epoch, ts, logs)
            if run.backup is not None:          # gathered by all, written by process 0
                saved = to_host((ts, run.stopper and run.stopper.state))
                if is_writer():
                    backup_file.save_run(run.backup.directory, *saved, epoch, history,
                                         run.callbacks, reason)
    finally:
        bar.close(reason)
    best = None
    if run.stopper:
        ts, best = run.stopper.finish(ts)
    if reason and reason.startswith("fit: non-finite"):
        if run.loop.on_nonfinite == "raise":
            raise FloatingPointError(reason)
        if is_writer():
            warnings.warn(reason, RuntimeWarning, stacklevel=4)
    return FitResult(ts, history, reason, best)
