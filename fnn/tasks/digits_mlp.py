"""Task ``digits-mlp``: a 64-128-64-10 ReLU network on scikit-learn's 8×8 digits.

The fixed split of :func:`fnn.data.load_digits` (1437 train / 360 test); 10% of the training
set held out for validation and early stopping (patience 8, best epoch restored); Adam;
softmax cross-entropy. Writes ``digits_mlp.safetensors``, ``digits_mlp_curves.png`` and
``digits_mlp_weights.png`` to ``out``.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

from fnn import checkpoint, data, losses, optim, train
from fnn.layers import Dense, Relu, serial
from fnn.tasks import Task, artifact_dir, backup_callbacks, default, register

LOSS = losses.softmax_cross_entropy_with_integer_labels


def model():
    """64 → 128 → 64 → 10 logits, ReLU between."""
    return serial(("fc1", Dense(128)), ("relu1", Relu()), ("fc2", Dense(64)), ("relu2", Relu()),
                  ("head", Dense(10)))


def run(*, epochs=None, lr=None, batch_size=None, seed=0, out="out", quiet=False, quick=False,
        resume=False, precision=None) -> dict:
    """Train (``quick``: 2 epochs), evaluate on the 360 test digits; returns
    ``test_accuracy``, ``test_loss``, ``best_epoch``, ``epochs``."""
    epochs = default(epochs, 2 if quick else 60)
    lr = default(lr, 1e-3)
    (x, y), test_xy = data.load_digits()
    train_xy, val_xy = data.split((x, y), 0.1, seed=seed)
    net = model()
    progress = False if quiet else (True if sys.stderr.isatty() else "lines")
    result = train.fit(net, LOSS, optim.adam(lr), train_xy, epochs=epochs,
                       batch_size=default(batch_size, 32), val_data=val_xy,
                       key=jax.random.PRNGKey(seed), loop=train.Loop(progress=progress),
                       callbacks=[train.EarlyStopping(8), *backup_callbacks(resume, out)],
                       precision=precision)
    ts = result.train_state
    test = train.evaluate(net, LOSS, ts.params, ts.state, test_xy)
    out = artifact_dir(out)                             # process 0 writes the files
    os.makedirs(out, exist_ok=True)
    checkpoint.save(os.path.join(out, "digits_mlp.safetensors"), ts)
    try:
        from fnn import plot
        plot.training_curves(result.history, os.path.join(out, "digits_mlp_curves.png"),
                             best_epoch=result.best_epoch)
        plot.histograms(ts.params, os.path.join(out, "digits_mlp_weights.png"),
                        title="digits-mlp weights after training")
    except ImportError:                                 # matplotlib is an optional extra
        pass
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "best_epoch": result.best_epoch, "epochs": len(result.history["epoch"])}


def problem(seed=0):
    """16 training digits and the freshly initialised network, for ``fnn gradcheck``."""
    (x, y), _ = data.load_digits()
    x = jnp.asarray(x[:16], jnp.zeros(()).dtype)
    net = model()
    params, state, _ = net.init(jax.random.PRNGKey(seed), x.shape)
    return net, LOSS, params, state, x, jnp.asarray(y[:16])


register(Task("digits-mlp", "64-128-64-10 ReLU MLP on sklearn digits, early stopping (~97%)",
              run, problem))
