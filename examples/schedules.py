"""Learning-rate schedules: fnn.optim.schedules plotted, and what they do to a training run.

Part 1 draws each schedule in ``fnn.optim.schedules`` over the same number of steps, with the
same peak rate (``OUT/schedules.png``, left).

Part 2 trains the same 64-64-10 ReLU network on the 8x8 digits (``fnn.data.load_digits``;
mini-batches of 32, SGD with momentum 0.9, peak rate 0.5 — deliberately high) under five of
them: constant, step decay, cosine annealing, warmup + cosine, and one-cycle. Held constant,
that rate keeps the loss bouncing high to the end; a schedule that ends small lets it settle.
(At a modest peak such as 0.1 this easy problem trains well under every schedule; the script
takes ``--peak``.)
Every schedule and seed runs in one jitted, vmapped program: the schedule is tabulated into an
array of per-step rates, so all of them share one compilation. The full training-set loss at
the end and the test accuracy are printed (median and range over ``--seeds``); the training
curves go to ``OUT/schedules.png``, right.

    python examples/schedules.py [--epochs 20] [--seeds 5] [--seed 0] [--out out] [--quick]
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fnn.optim as optim
from fnn import backprop, data
from fnn.layers import Dense, Relu, serial
from fnn.losses import softmax_cross_entropy_with_integer_labels as cross_entropy
from fnn.plot import save as save_figure

S = optim.schedules
MODEL = serial(Dense(64), Relu(), Dense(10))
BATCH, PEAK = 32, 0.5


def all_schedules(total, peak=PEAK):
    """Name → schedule, each ``total`` steps long with peak rate ``peak``."""
    return {
        "constant": S.constant(peak),
        "step decay (×0.3 every 30%)": S.step_decay(peak, 0.3, max(1, int(0.3 * total))),
        "exponential decay": S.exponential_decay(peak, 0.01, total),
        "cosine annealing": S.cosine_annealing(peak, total),
        "warmup + cosine": S.warmup_cosine(0.0, peak, max(1, total // 10), total),
        "one-cycle": S.one_cycle(total, peak),
        "polynomial (power 2)": S.polynomial(peak, 0.0, 2.0, total),
    }


TRAINED = ("constant", "step decay (×0.3 every 30%)", "cosine annealing", "warmup + cosine",
           "one-cycle")


def tabulate(schedule, total):
    """The schedule's rate at steps ``0 … total − 1`` as an array."""
    return jax.jit(jax.vmap(schedule))(jnp.arange(total))     # one compilation, not one per op


@partial(jax.jit, static_argnames=("epochs",))
def train(params, rates, x, y, key, epochs):
    """SGD with momentum 0.9 at ``rates[t]`` on step ``t``; one epoch = one pass in shuffled
    mini-batches of 32. **Returns:** ``(params, loss per step: [epochs · steps])``."""
    steps = x.shape[0] // BATCH
    opt = optim.sgd(lambda t: rates[jnp.minimum(t, rates.shape[0] - 1)], momentum=0.9)
    vg = backprop.value_and_grad(MODEL, cross_entropy)
    state = {n: {} for n in params}

    def step(carry, batch):
        params, opt_state = carry
        (loss, _), grads = vg(params, state, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optim.apply_updates(params, updates), opt_state), loss

    def epoch(carry, k):
        order = jax.random.permutation(k, x.shape[0])[:steps * BATCH]
        xb = x[order].reshape(steps, BATCH, x.shape[1])         # (steps, batch, 64)
        yb = y[order].reshape(steps, BATCH)                     # (steps, batch)
        return jax.lax.scan(step, carry, (xb, yb))

    carry = (params, opt.init(params))
    (params, _), losses = jax.lax.scan(epoch, carry, jax.random.split(key, epochs))
    return params, losses.reshape(-1)


def evaluate(params, x, y):
    logits = MODEL.apply(params, {n: {} for n in params}, x)[0]
    return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def plot(tables, curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for name, r in tables.items():
        a.plot(np.asarray(r), label=name, lw=1.5)
    a.set(title=f"fnn.optim.schedules (peak {np.max(tables['constant']):g})",
          xlabel="optimizer step", ylabel="learning rate")
    a.legend(fontsize=7)
    k = max(1, curves[TRAINED[0]].shape[1] // 40)              # smooth: mean over k steps
    for name, c in curves.items():
        med = np.median(c, 0)
        med = med[: len(med) // k * k].reshape(-1, k).mean(1)
        b.semilogy(np.arange(len(med)) * k, med, label=name, lw=1.2)
    b.set(title=f"digits MLP, SGD + momentum: mini-batch loss (mean of {k} steps)",
          xlabel="optimizer step", ylabel="cross-entropy")
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--peak", type=float, default=PEAK, help="peak learning rate")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="6 epochs, 2 seeds")
    args = ap.parse_args(argv)
    epochs, n_seeds = (6, 2) if args.quick else (args.epochs, args.seeds)
    dtype = jnp.zeros(()).dtype

    (x, y), (x_te, y_te) = data.load_digits(dtype=np.dtype(dtype))
    total = epochs * (x.shape[0] // BATCH)
    tables = {k: tabulate(s, total) for k, s in all_schedules(total, args.peak).items()}
    seeds = list(range(args.seed, args.seed + n_seeds))
    init = jax.jit(jax.vmap(lambda k: MODEL.init(k, x.shape)[0]))    # params only: arrays
    stacked = init(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    keys = jnp.stack([jax.random.PRNGKey(1000 + s) for s in seeds])   # batch order per seed
    rates = jnp.stack([tables[k] for k in TRAINED])                    # (schedules, steps)
    run = jax.vmap(jax.vmap(train, (0, None, None, None, 0, None)),   # over seeds
                   (None, 0, None, None, None, None))                  # over schedules
    params, curves = run(stacked, rates, jnp.asarray(x), jnp.asarray(y), keys, epochs)
    final = jax.jit(jax.vmap(jax.vmap(evaluate, (0, None, None)), (0, None, None)))
    train_loss, _ = final(params, jnp.asarray(x), jnp.asarray(y))
    _, test_acc = final(params, jnp.asarray(x_te), jnp.asarray(y_te))
    train_loss, test_acc = np.asarray(train_loss), np.asarray(test_acc)

    print(f"{epochs} epochs ({total} steps) of SGD + momentum, batch {BATCH}, peak {args.peak}, "
          f"{n_seeds} seeds: median (min to max)")
    print(f"  {'schedule':28s} {'final training loss':>28s} {'test accuracy':>24s}")
    for i, name in enumerate(TRAINED):
        l, a = train_loss[i], test_acc[i]
        print(f"  {name:28s} {np.median(l):9.4f} ({l.min():.4f} to {l.max():.4f})"
              f"   {np.median(a):6.3f} ({a.min():.3f} to {a.max():.3f})")
    ratio = {k: np.median(train_loss[0]) / np.median(train_loss[i])
             for i, k in enumerate(TRAINED) if i}
    print("constant's median final loss / each schedule's: "
          + ", ".join(f"{k} {r:.1f}x" for k, r in ratio.items()))
    path = os.path.join(args.out, "schedules.png")
    plot(tables, {k: np.asarray(curves[i]) for i, k in enumerate(TRAINED)}, path)
    print(f"figure -> {path}")
    return {"total_steps": total, "tables": {k: np.asarray(v) for k, v in tables.items()},
            "trained": TRAINED, "train_loss": dict(zip(TRAINED, train_loss)),
            "test_accuracy": dict(zip(TRAINED, test_acc)), "figure": path}


if __name__ == "__main__":
    main()
