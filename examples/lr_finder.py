"""The learning-rate finder: fnn.train.lr_find's loss-versus-rate curve, then training at its rate.

The lesson's LR-finder section. ``lr_find`` trains from a tiny learning rate upward, multiplying
it by a constant factor every step (here 10⁻⁴ to 10 in 100 steps), records each step's loss,
and stops once the loss exceeds 4 times its best (divergence). Its suggestion is a tenth of
the rate at the lowest (smoothed) loss: the loss still falls fast there, and it is safely below
the rates where training blows up. An MLP 64-64-10 with SGD (momentum 0.9) on sklearn's
digits; then ``fnn.train.fit`` trains it for a few epochs at the suggested rate, at a rate
100 times smaller and at one 100 times larger, from several seeds each (the three rates share
one compiled epoch: fnn's optimizers keep the rate in their state). Figure:
``OUT/lr_finder.png``.

    python examples/lr_finder.py [--epochs 10] [--seeds 3] [--out out] [--quick]
"""
import argparse
import os

import jax
import numpy as np
from sklearn.datasets import load_digits

from fnn import losses, optim, train
from fnn.layers import Dense, Relu, serial
from fnn.plot import save as save_figure

xent = losses.softmax_cross_entropy_with_integer_labels


def data(n_train=1200):
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    tr, va = order[:n_train], order[n_train:]
    return (x[tr], y[tr]), (x[va], y[va])


def model():
    return serial(Dense(64), Relu(), Dense(10))


def make_sgd(lr):
    return optim.sgd(lr, momentum=0.9)


def find(train_data, args):
    return train.lr_find(model(), xent, make_sgd, train_data, batch_size=args.batch,
                         key=jax.random.PRNGKey(args.seed), min_lr=1e-4, max_lr=10.0,
                         steps=100)


def runs(rates, train_data, val_data, args):
    """``{name: [history per seed]}``, each trained with ``fit`` at its rate."""
    out = {}
    for name, lr in rates.items():
        out[name] = [train.fit(model(), xent, make_sgd(lr), train_data, epochs=args.epochs,
                               batch_size=args.batch, val_data=val_data,
                               key=jax.random.PRNGKey(args.seed + 1 + s),
                               loop=train.Loop(progress=False, on_nonfinite="stop")).history
                     for s in range(args.seeds)]
    return out


def plot(found, rates, hist, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.semilogx(found.lrs, found.losses, color="grey", lw=0.8, label="loss per step")
    for (name, lr), color in zip(rates.items(), ("C2", "C0", "C3")):
        a.axvline(lr, color=color, ls="--", lw=1, label=f"{name}: {lr:.2g}")
    a.set_xlabel("learning rate (log)")
    a.set_ylabel("training loss")
    a.set_title("lr_find: one step per rate")
    a.legend(fontsize=8)
    for (name, hs), color in zip(hist.items(), ("C2", "C0", "C3")):
        for i, h in enumerate(hs):
            b.plot(h["epoch"], h["val_loss"], color=color, lw=1,
                   label=f"{name} ({rates[name]:.2g})" if i == 0 else None)
    b.set_yscale("log")
    b.set_xlabel("epoch")
    b.set_ylabel("validation loss")
    b.set_title(f"fit at three rates ({len(hs)} seeds each)")
    b.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and seeds (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = min(args.epochs, 5), min(args.seeds, 2)
    train_data, val_data = data()
    found = find(train_data, args)
    best = found.suggestion * 10
    print(f"lr_find: {len(found.lrs)} steps from {found.lrs[0]:.1e} to {found.lrs[-1]:.2g} "
          f"(diverged: {found.diverged}); lowest smoothed loss at {best:.3g}, suggestion "
          f"{found.suggestion:.3g}")
    rates = {"suggested": found.suggestion, "100x smaller": found.suggestion / 100,
             "100x larger": found.suggestion * 100}
    hist = runs(rates, train_data, val_data, args)
    result = {"found": found, "rates": rates, "history": hist}
    print(f"fit, {args.epochs} epochs, {args.seeds} seeds: final validation loss / accuracy")
    for name, hs in hist.items():
        loss = np.array([h["val_loss"][-1] if len(h["val_loss"]) == args.epochs else np.inf
                         for h in hs])
        acc = np.array([h["val_accuracy"][-1] if len(h["val_loss"]) == args.epochs else 0.0
                        for h in hs])
        result[name] = {"val_loss": loss, "val_accuracy": acc}
        print(f"  {name:13s} lr {rates[name]:<9.3g} val loss " + ", ".join(
            f"{v:.3g}" for v in loss) + "   val acc " + ", ".join(f"{v:.3f}" for v in acc))
    path = os.path.join(args.out, "lr_finder.png")
    plot(found, rates, hist, path)
    print(f"wrote {path}")
    result["figure"] = path
    return result


if __name__ == "__main__":
    main()
