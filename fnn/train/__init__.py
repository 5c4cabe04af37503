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
from fnn.train.epoch import evaluate
from fnn.train.fitting import FitResult, fit
from fnn.train.lr_finder import LRFindResult, lr_find
from fnn.train.metrics import binary_accuracy, categorical_accuracy
from fnn.train.step import StepMetrics, TrainState, create_train_state, make_step

__all__ = ["TrainState", "StepMetrics", "FitResult", "LRFindResult", "create_train_state",
           "make_step", "fit", "evaluate", "lr_find", "categorical_accuracy", "binary_accuracy"]
