"""SGD, momentum, RMSprop, Adam and AdamW on the 8x8 digits, side by side.

The same 64-64-10 ReLU network, from the same initial weights, is trained with each of
``fnn.optim``'s optimizers on scikit-learn's digits (a fixed stratified 80/20 split, seed 0),
mini-batches of 64 for a fixed number of epochs, gradients from the layers' hand-derived
backward (``fnn.backprop``); each epoch is one jitted ``lax.scan``. The training and test loss
curves go to ``OUT/optimizers.png`` and the final losses and test accuracies are printed.

    python examples/optimizers.py [--epochs 40] [--seed 0] [--out out] [--quick]
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fnn.optim as optim
from fnn import backprop, data
from fnn.layers import Dense, Relu, serial
from fnn.losses import softmax_cross_entropy_with_integer_labels as cross_entropy
from fnn.plot import save as save_figure

OPTIMIZERS = {  # name: optimizer, learning rates as commonly recommended for each
    "SGD": optim.sgd(0.1),
    "Momentum": optim.sgd(0.05, momentum=0.9),
    "RMSprop": optim.rmsprop(1e-3),
    "Adam": optim.adam(1e-3),
    "AdamW": optim.adamw(1e-3, weight_decay=5e-2, mask=optim.not_named("b")),
}


def load(seed=0):
    """``fnn.data.load_digits``: pixels in [0, 1], a stratified 80/20 split with a fixed seed."""
    (x_tr, y_tr), (x_te, y_te) = data.load_digits(seed=seed)
    return (jnp.asarray(x_tr), jnp.asarray(y_tr)), (jnp.asarray(x_te), jnp.asarray(y_te))


def make_epoch(model, state, opt, batch_size):
    """A jitted epoch: shuffle, then one optimizer step per full mini-batch (``lax.scan``)."""
    value_and_grad = backprop.value_and_grad(model, cross_entropy)

    def step(carry, batch):
        params, opt_state = carry
        (loss, _), grads = value_and_grad(params, state, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optim.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def epoch(params, opt_state, x, y, key):
        n = (x.shape[0] // batch_size) * batch_size
        order = jax.random.permutation(key, x.shape[0])[:n]
        xb = x[order].reshape(-1, batch_size, x.shape[1])  # (steps, batch, 64)
        yb = y[order].reshape(-1, batch_size)               # (steps, batch)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xb, yb))
        return params, opt_state, jnp.mean(losses)

    return epoch


def evaluator(model, state, x, y):
    def evaluate(params):
        logits = model.apply(params, state, x)[0]
        return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return jax.jit(evaluate)


def train(model, params0, state, opt, data, epochs, batch_size, seed, evaluate):
    """``epochs`` epochs of ``opt``; ``evaluate(params) -> (test loss, accuracy)`` is shared by
    all optimizers (compiled once). **Returns:** ``(history, final accuracy, params)``."""
    (x, y), _ = data
    epoch = make_epoch(model, state, opt, batch_size)
    params, opt_state = params0, opt.init(params0)
    history = {"train": [], "test": []}
    for e in range(epochs):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), e)  # same batches for every optimizer
        params, opt_state, train_loss = epoch(params, opt_state, x, y, key)
        test_loss, acc = evaluate(params)
        history["train"].append(float(train_loss))
        history["test"].append(float(test_loss))
    return history, float(acc), params


def plot(histories, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, h in histories.items():
        epochs = np.arange(1, len(h["train"]) + 1)
        line, = axes[0].plot(epochs, h["train"], label=name)
        axes[1].plot(epochs, h["test"], color=line.get_color(), label=name)
    for ax, title in zip(axes, ("training loss (mean over the epoch)", "test loss")):
        ax.set(title=title, xlabel="epoch", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("softmax cross-entropy")
    axes[1].legend()
    fig.suptitle("fnn.optim on the 8x8 digits: 64-64-10 MLP, batch 64")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Compare fnn.optim optimizers on the digits.")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="3 epochs, for a smoke test")
    args = ap.parse_args(argv)
    epochs = 3 if args.quick else args.epochs

    data = load(args.seed)
    model = serial(Dense(64), Relu(), Dense(10))
    params0, state, _ = model.init(jax.random.PRNGKey(args.seed), (args.batch_size, 64))
    histories, accuracy, trained = {}, {}, {}
    evaluate = evaluator(model, state, *data[1])
    start = time.perf_counter()
    for name, opt in OPTIMIZERS.items():
        histories[name], accuracy[name], trained[name] = train(
            model, params0, state, opt, data, epochs, args.batch_size, args.seed, evaluate)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "optimizers.png")
    plot(histories, path)
    print(f"{epochs} epochs each, {time.perf_counter() - start:.1f} s in all; curves: {path}")
    print(f"{'optimizer':<10}{'train loss':>12}{'test loss':>11}{'test acc':>10}")
    for name, h in histories.items():
        print(f"{name:<10}{h['train'][-1]:>12.4f}{h['test'][-1]:>11.4f}{accuracy[name]:>10.3f}")
    return {"histories": histories, "test_accuracy": accuracy, "params": trained,
            "test_data": data[1], "figure": path}


if __name__ == "__main__":
    main()
