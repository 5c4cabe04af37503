"""Training: a ``TrainState`` pytree, a jitted train step, whole epochs as one compiled call.

::

    result = fit(model, losses.softmax_cross_entropy_with_integer_labels, optim.adam(1e-3),
                 (x_train, y_train), epochs=20, batch_size=32, val_data=(x_val, y_val),
                 key=jax.random.PRNGKey(0), metrics=["accuracy", "macro_f1"],
                 callbacks=[EarlyStopping(5)])
    result.train_state.params, result.history["val_accuracy"]

One concern per module:

- ``step``: :class:`TrainState`, :func:`create_train_state`, :func:`make_step` (gradients from
  ``jax.value_and_grad``, the layers' hand-derived rules, or a given function).
- ``options``: :class:`Step` (what a step computes) and :class:`Loop` (how epochs run), the
  options of :func:`fit` that most runs leave as they are.
- ``epoch``: an in-memory epoch as **one** jitted call (shuffle, a ``lax.while_loop`` over the
  full batches that leaves at the first non-finite loss, then the real partial batch), chunks
  of streamed steps, :func:`evaluate`. The loop carries only the sums the history reports.
- ``predicting``: :func:`predict`, batched eval-mode outputs (one program for every batch).
- ``loops``: one epoch on the host, in memory or streamed, behind one interface; the replay
  after a non-finite step.
- ``validation``: validation during ``fit``, on arrays or a stream, behind one interface.
- ``streaming``: any iterable of batches, prefetched to the device in a background thread.
- ``data_checks``: the checks of the data before training (finite, labels, token ids).
- ``metrics``: accuracy, top-k accuracy, mean absolute error, macro F1, your own.
- ``callbacks``: :class:`EarlyStopping`, :class:`ModelCheckpoint`, :class:`CSVLogger`,
  :class:`ReduceLROnPlateau`, :class:`TimeLimit`.
- ``tensorboard``: :class:`TensorBoard`, the history as TensorBoard scalars (``fnn[tensorboard]``).
- ``resume``: :class:`BackupAndRestore`: the run's whole state saved atomically each epoch,
  and resumed from.
- ``distributed``: ``fit`` on a :class:`fnn.sharding.Distribution`.
- ``fitting``: :func:`fit`; ``lr_finder``: :func:`lr_find`; ``cache``: compiled epochs reused
  across ``fit`` calls whose model, loss and optimizer compute the same thing.

NaN/Inf guard: the loop leaves the epoch at the first step whose loss (and, with
``Step(grad_norm=True)``, gradient norm) is not finite, and the epoch is bad too when the
params or optimizer state it ends with are not finite (one check per epoch); ``fit`` then
replays the epoch from its start (same program, same inputs, so the same state bit for bit)
with every step's gradient checked as well, up to the step before the first non-finite one
(the last good state), and stops with a message naming the epoch and the step, and whether
that batch's inputs were finite. So a NaN gradient whose loss is finite is found in the step it
appears, and the check of every gradient is paid only when the replay runs.
"""
from fnn.train.epoch import evaluate
from fnn.train.predicting import predict
from fnn.train.fitting import FitResult, fit
from fnn.train.options import Loop, Step
from fnn.train.callbacks import (Callback, CSVLogger, EarlyStopping, ModelCheckpoint,
                                 ReduceLROnPlateau, TimeLimit)
from fnn.train.resume import BackupAndRestore
from fnn.train.tensorboard import TensorBoard
from fnn.train.lr_finder import LRFindResult, lr_find
from fnn.train.metrics import (Metric, binary_accuracy, categorical_accuracy, macro_f1,
                               mean_absolute_error, mean_metric, top_k_accuracy)
from fnn.train.step import StepMetrics, TrainState, create_train_state, make_step

__all__ = ["TrainState", "StepMetrics", "FitResult", "LRFindResult", "create_train_state",
           "make_step", "fit", "Step", "Loop", "evaluate", "predict", "lr_find",
           "categorical_accuracy",
           "binary_accuracy", "Metric", "mean_metric", "top_k_accuracy", "mean_absolute_error",
           "macro_f1", "Callback", "EarlyStopping", "BackupAndRestore", "ModelCheckpoint",
           "CSVLogger", "ReduceLROnPlateau", "TimeLimit", "TensorBoard"]
