"""Task ``xor``: a 2-8-1 tanh network learns noisy XOR with the hand-derived backward.

Points scattered (std 0.15) around the four corners of the unit square, label ``x1 XOR x2``;
no straight line separates the classes, one hidden layer does. Trained with ``grad="manual"``
(the layers' own backward rules) and Adam; writes ``xor.safetensors``, ``xor_curves.png`` and
``xor_boundary.png`` to ``out``.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checkpoint, data, losses, optim, train
from fnn.initializers import glorot_normal
from fnn.layers import Dense, Tanh, serial
from fnn.tasks import Task, artifact_dir, backup_callbacks, default, register

LOSS = losses.sigmoid_binary_cross_entropy


def model():
    """2 → 8 (tanh) → 1 logit."""
    return serial(("hidden", Dense(8, w_init=glorot_normal())), ("tanh", Tanh()),
                  ("out", Dense(1, w_init=glorot_normal())))


def _data(n, seed):
    x, y = data.xor(n, noise=0.15, seed=seed)
    return x, y[:, None].astype(x.dtype)                # targets (n, 1) like the logits


def run(*, epochs=None, lr=None, batch_size=None, seed=0, out="out", quiet=False, quick=False,
        resume=False, precision=None) -> dict:
    """Train on 512 noisy points (64 with ``quick``; 128 more for the validation curves), test
    on 256 fresh ones and on the four exact corners; returns ``test_accuracy``,
    ``truth_table_accuracy``, ``test_loss``."""
    epochs = default(epochs, 3 if quick else 40)
    lr = default(lr, 0.05)
    net = model()
    train_xy, test_xy = _data(64 if quick else 512, seed), _data(256, seed + 1)
    val_xy = _data(128, seed + 2)             # curves and val_*; test_xy is used once, at the end
    progress = False if quiet else (True if sys.stderr.isatty() else "lines")
    result = train.fit(net, LOSS, optim.adam(lr), train_xy, epochs=epochs,
                       batch_size=default(batch_size, 32), val_data=val_xy,
                       key=jax.random.PRNGKey(seed), step=train.Step(grad="manual"),
                       loop=train.Loop(progress=progress), precision=precision,
                       callbacks=backup_callbacks(resume, out))
    ts = result.train_state
    test = train.evaluate(net, LOSS, ts.params, ts.state, test_xy)
    corners, labels = _data(4, 0)
    logits = net.apply(ts.params, ts.state, jnp.asarray(corners))[0]
    table = float(np.mean((np.asarray(logits) > 0) == (labels > 0.5)))
    out = artifact_dir(out)                             # process 0 writes the files
    os.makedirs(out, exist_ok=True)
    checkpoint.save(os.path.join(out, "xor.safetensors"), ts)
    _plots(net, ts, result.history, test_xy, out)
    return {"test_accuracy": test["accuracy"], "truth_table_accuracy": table,
            "test_loss": test["loss"], "epochs": len(result.history["epoch"])}


def _plots(net, ts, history, test_xy, out):
    try:
        from fnn import plot
        plot.training_curves(history, os.path.join(out, "xor_curves.png"))
        prob = lambda g: jax.nn.sigmoid(net.apply(ts.params, ts.state, jnp.asarray(g))[0])
        plot.decision_boundary(prob, test_xy[0], test_xy[1], os.path.join(out, "xor_boundary.png"),
                               title="XOR: P(class 1)", class_names=("x1 XOR x2 = 0",
                                                                     "x1 XOR x2 = 1"))
    except ImportError:                                 # matplotlib is an optional extra
        pass


def problem(seed=0):
    """8 noisy XOR points and the freshly initialised 2-8-1 network, for ``fnn gradcheck``."""
    x, t = (jnp.asarray(a, jnp.zeros(()).dtype) for a in _data(8, seed))
    net = model()
    params, state, _ = net.init(jax.random.PRNGKey(seed), x.shape)
    return net, LOSS, params, state, x, t


register(Task("xor", "2-8-1 tanh MLP on noisy XOR, hand-derived backprop (seconds)", run, problem))
