"""Regularization on digits: L2, L1, dropout, data augmentation and early stopping, side by side.

The lesson's regularization chapter. An over-sized MLP (64-128-128-10) trained with Adam on only
200 of sklearn's 8x8 digits memorizes them: training accuracy reaches 100% and the training loss
falls toward 0, while the validation loss stops falling and climbs again. Five variants from
the same init, split and batch order, several seeds each:

- ``none``;
- ``L2``: ``fnn.regularizers.l2(λ)`` on the kernels, ``½·λ·Σw²`` (its gradient ``λ·w``, hand-derived);
- ``L1``: ``fnn.regularizers.l1(λ)`` on the kernels, ``λ·Σ|w|`` (gradient ``λ·sign(w)``);
- ``dropout``: ``Dropout(0.5)`` after each hidden layer;
- ``augment``: each training batch moved by ``fnn.augment.random_affine`` (±10°, ±1 pixel).

Early stopping (``fnn.regularizers.early_stopping``, patience ``--patience`` epochs on the
validation loss) watches every run; its best epoch and the validation numbers there are printed
next to the final ones. All the variants but dropout are one compiled program, ``jax.vmap``-ed
over (variant, seed): the penalty scales and the augmentation switch are numbers, not code.
Gradients come from the layers' hand-derived backward (``fnn.backprop.value_and_grad``).
Curves: ``OUT/regularization.png``.

    python examples/regularization.py [--epochs 60] [--seeds 3] [--out out] [--quick]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from fnn import augment, backprop, losses, optim, regularizers
from fnn.layers import Dense, Dropout, Flatten, Relu, serial
from fnn.plot import save as save_figure

VARIANTS = ("none", "L2", "L1", "dropout", "augment")
KERNELS = optim.not_named("b")                  # penalize the kernels, not the biases
xent = losses.softmax_cross_entropy_with_integer_labels


def load(n_train, n_val, seed=0):
    """Digits as ``[n, 8, 8, 1]`` images in [0, 1]; a fixed random split (``seed``)."""
    d = load_digits()
    x, y = (d.images / 16.0)[..., None], d.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, va = order[:n_train], order[n_train:n_train + n_val]
    return (jnp.asarray(x[tr]), jnp.asarray(y[tr])), (jnp.asarray(x[va]), jnp.asarray(y[va]))


def make_model(width, dropout):
    hidden = []
    for _ in range(2):
        hidden += [Dense(width), Relu()] + ([Dropout(0.5)] if dropout else [])
    return serial(Flatten(), *hidden, Dense(10))


def kernel_stats(params):
    """``(‖w‖₂ over all kernels, fraction of kernel weights with |w| < 1e-3)``."""
    ws = [w for path, w in jax.tree_util.tree_leaves_with_path(params)
          if getattr(path[-1], "key", None) == "w"]
    flat = jnp.concatenate([w.ravel() for w in ws])
    return jnp.sqrt(jnp.sum(flat ** 2)), jnp.mean(jnp.abs(flat) < 1e-3)


def make_run(model, args, train, val, augmented=True):
    """``run(key, l2, l1, aug) -> history``: one whole training run (``lax.scan`` over epochs,
    each a ``lax.scan`` over shuffled batches) with the regularization given as numbers
    (``augmented=False`` leaves the augmentation out of the program)."""
    x, y = train
    steps = x.shape[0] // args.batch
    vg = backprop.value_and_grad(model, xent)
    opt = optim.adam(args.lr)
    shift = augment.random_affine(max_degrees=args.degrees, max_shift=args.shift)
    es = regularizers.early_stopping(args.patience)

    def evaluate(params, state, xs, ys):
        logits, _ = model.apply(params, state, xs)
        return xent(logits, ys), jnp.mean(jnp.argmax(logits, -1) == ys)

    def run(key, l2, l1, aug):
        penalty = [regularizers.l2(l2, mask=KERNELS), regularizers.l1(l1, mask=KERNELS)]
        params, state, _ = model.init(jax.random.fold_in(key, 0), (args.batch,) + x.shape[1:])

        def step(carry, idx_key):
            params, opt_state = carry
            idx, k = idx_key
            k_aug, k_drop = jax.random.split(k)
            xb, yb = x[idx], y[idx]
            if augmented:
                xb = jnp.where(aug, shift(k_aug, xb, yb)[0], xb)
            (_, _), grads = vg(params, state, xb, yb, key=k_drop, train=True)
            grads = jax.tree.map(lambda g, a, b: g + a + b, grads,
                                 *(p.grad(params) for p in penalty))
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optim.apply_updates(params, updates), opt_state), None

        def epoch(carry, e):
            params, opt_state, es_state = carry
            k_perm, k_steps = jax.random.split(jax.random.fold_in(key, e + 1))
            idx = jax.random.permutation(k_perm, x.shape[0])[:steps * args.batch]
            (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (
                idx.reshape(steps, args.batch), jax.random.split(k_steps, steps)))
            row = evaluate(params, state, *train) + evaluate(params, state, *val)
            es_state = es.update(es_state, row[2], params)
            return (params, opt_state, es_state), row
        (params, _, es_state), rows = jax.lax.scan(
            epoch, (params, opt.init(params), es.init(params)), jnp.arange(args.epochs))
        return {"train_loss": rows[0], "train_acc": rows[1], "val_loss": rows[2],
                "val_acc": rows[3], "best_epoch": es_state.best_step,
                "best_val_loss": es_state.best_loss, "stop": es_state.stop,
                "kernel": kernel_stats(params),
                "best_kernel": kernel_stats(regularizers.restore_best(es_state))}
    return jax.jit(jax.vmap(run))


def train_all(args, train, val):
    """Every variant × seed; returns ``{variant: history}`` with arrays ``[seeds, ...]``."""
    seeds = jax.random.split(jax.random.PRNGKey(args.seed), args.seeds)
    setting = {"none": (0.0, 0.0, False), "L2": (args.l2, 0.0, False),
               "L1": (0.0, args.l1, False), "augment": (0.0, 0.0, True)}
    names = list(setting)
    cols = [jnp.repeat(jnp.asarray([setting[n][i] for n in names]), args.seeds)
            for i in range(3)]
    keys = jnp.tile(seeds, (len(names), 1))
    out = make_run(make_model(args.width, False), args, train, val)(keys, *cols)
    hist = {n: jax.tree.map(lambda a: np.asarray(a)[i * args.seeds:(i + 1) * args.seeds], out)
            for i, n in enumerate(names)}
    z = jnp.zeros(args.seeds)
    drop = make_run(make_model(args.width, True), args, train, val, False)(seeds, z, z, z > 0)
    hist["dropout"] = jax.tree.map(np.asarray, drop)
    return {v: hist[v] for v in VARIANTS}


def plot(hist, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    for (name, h), color in zip(hist.items(), ("C3", "C0", "C1", "C2", "C4")):
        e = np.arange(1, h["val_loss"].shape[1] + 1)
        axes[0].semilogy(e, np.median(h["train_loss"], 0), color=color, ls="--")
        axes[0].semilogy(e, np.median(h["val_loss"], 0), color=color, label=name)
        axes[1].plot(e, np.median(h["val_acc"], 0), color=color, label=name)
        axes[1].fill_between(e, h["val_acc"].min(0), h["val_acc"].max(0), color=color,
                             alpha=0.15)
    b = int(np.median(hist["none"]["best_epoch"])) + 1
    axes[0].axvline(b, color="C3", lw=0.8, ls=":")
    axes[0].annotate("early stopping's best\nepoch ('none', median)", (b, axes[0].get_ylim()[1]),
                     fontsize=8, va="top", ha="left")
    axes[0].set_title("loss (dashed: training, solid: validation)")
    axes[1].set_title("validation accuracy (band: min–max over seeds)")
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    w = {n: h["kernel"] for n, h in hist.items()}
    axes[2].bar(np.arange(len(w)) - 0.2, [np.median(v[0]) for v in w.values()], 0.4,
                label="‖w‖₂ of the kernels")
    ax2 = axes[2].twinx()
    ax2.bar(np.arange(len(w)) + 0.2, [np.median(v[1]) for v in w.values()], 0.4, color="C1",
            label="fraction |w| < 10⁻³")
    axes[2].set_xticks(np.arange(len(w)), list(w))
    axes[2].set_title("weights after training (median over seeds)")
    axes[2].legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=600)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--l2", type=float, default=1e-3, help="λ of the ½·λ·Σw² penalty")
    ap.add_argument("--l1", type=float, default=1e-4, help="λ of the λ·Σ|w| penalty")
    ap.add_argument("--degrees", type=float, default=10.0, help="augmentation: max rotation")
    ap.add_argument("--shift", type=float, default=1.0, help="augmentation: max shift (pixels)")
    ap.add_argument("--patience", type=int, default=10, help="early stopping's patience")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and seeds (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.n_val = min(args.epochs, 40), min(args.seeds, 2), 300

    train, val = load(args.n_train, args.n_val)
    print(f"digits: {args.n_train} train / {args.n_val} validation, MLP 64-{args.width}-"
          f"{args.width}-10, Adam {args.lr}, {args.epochs} epochs of batch {args.batch}, "
          f"{args.seeds} seeds (median, [min–max])")
    hist = train_all(args, train, val)
    fmt = lambda a: f"{np.median(a):.3f} [{np.min(a):.3f}–{np.max(a):.3f}]"
    result = {}
    for name, h in hist.items():
        r = result[name] = {k: h[k][:, -1] for k in ("train_loss", "train_acc", "val_loss",
                                                      "val_acc")}
        best = h["best_epoch"]
        r.update(best_epoch=best + 1, best_val_loss=h["best_val_loss"],
                 best_val_acc=h["val_acc"][np.arange(len(best)), best], kernel_norm=h["kernel"][0],
                 small_weights=h["kernel"][1], history=h)
        print(f"  {name:8s} train loss {fmt(r['train_loss'])}  acc {fmt(r['train_acc'])}  val acc {fmt(r['val_acc'])}  "
              f"val−train loss {fmt(r['val_loss'] - r['train_loss'])}")
        print(f"  {'':8s} early stopping: best epoch {np.median(r['best_epoch']):.0f} "
              f"[{r['best_epoch'].min()}–{r['best_epoch'].max()}]  val loss "
              f"{fmt(r['best_val_loss'])} (final {fmt(r['val_loss'])})  val acc "
              f"{fmt(r['best_val_acc'])};  ‖w‖ {fmt(r['kernel_norm'])}  |w|<1e-3 "
              f"{fmt(r['small_weights'])}")
    path = os.path.join(args.out, "regularization.png")
    plot(hist, path)
    print(f"wrote {path}")
    result["figure"] = path
    return result


if __name__ == "__main__":
    main()
