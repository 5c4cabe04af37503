"""Regularization on digits: none, dropout, batch norm and L2 on the same over-sized MLP.

The lesson's regularization story. A 64-256-256-10 MLP trained on only 200 of sklearn's 8x8
digits memorizes them: training accuracy reaches 100% and training loss falls toward 0, while
validation loss levels off some hundred times higher. The same network with dropout (0.5 after
each hidden layer), batch norm (before each ReLU) or an L2 penalty on the kernels
(``0.5·λ·Σw²``) is trained from the same init, split and batch order (Adam, jitted epochs).
Training and validation curves go side by side to ``OUT/regularization.png``; the overfitting
gap (train − validation accuracy, validation − train loss) is printed for each. Digits is an
easy set, so expect the regularizers to narrow the gap by a little, not to transform it.

    python examples/regularization.py [--epochs 60] [--out out] [--quick]
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from tqdm import tqdm

from fnn import losses
from fnn.layers import BatchNorm, Dense, Dropout, Relu, serial

try:                                        # fnn's own Adam if present, else optax's
    from fnn.optim import adam, apply_updates
except ImportError:                         # pragma: no cover
    from optax import adam, apply_updates
try:                                        # fnn's L2 penalty if present, else inline 0.5·λ·Σw²
    from fnn.optim import not_named
    from fnn.regularizers import l2 as _l2

    def l2_penalty(lam):
        return _l2(lam, mask=not_named("b", "scale", "offset"))
except ImportError:                         # pragma: no cover
    def l2_penalty(lam):
        return lambda params: 0.5 * lam * sum(
            jnp.sum(p ** 2) for path, p in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "w")

xent = losses.softmax_cross_entropy_with_integer_labels


def load(n_train, seed):
    """Digits scaled to [0, 1]; a fixed random split: ``n_train`` to train, the rest validate."""
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, va = order[:n_train], order[n_train:]
    return (jnp.asarray(x[tr]), jnp.asarray(y[tr])), (jnp.asarray(x[va]), jnp.asarray(y[va]))


def make_model(kind, width):
    """The MLP with the regularizer's layers put in place."""
    hidden = []
    for _ in range(2):
        hidden += [Dense(width, use_bias=kind != "batch norm")]
        hidden += [BatchNorm()] if kind == "batch norm" else []
        hidden += [Relu()] + ([Dropout(0.5)] if kind == "dropout" else [])
    return serial(*hidden, Dense(10))


def make_epoch(model, opt, penalty, train, batch):
    """One jitted epoch: shuffle, then a ``lax.scan`` of Adam steps over the mini-batches."""
    x, y = train
    steps = x.shape[0] // batch

    def loss_fn(params, state, xb, yb, key):
        logits, state = model.apply(params, state, xb, key=key, train=True)
        return xent(logits, yb) + penalty(params), state

    def step(carry, idx_key):
        params, state, opt_state = carry
        idx, key = idx_key
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x[idx], y[idx], key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (apply_updates(params, updates), state, opt_state), loss

    @jax.jit
    def epoch(params, state, opt_state, key):
        k_perm, k_drop = jax.random.split(key)
        idx = jax.random.permutation(k_perm, x.shape[0])[:steps * batch].reshape(steps, batch)
        carry, _ = jax.lax.scan(step, (params, state, opt_state),
                                (idx, jax.random.split(k_drop, steps)))
        return carry
    return epoch


def make_eval(model, train, val):
    """Loss and accuracy on both splits in one jitted call, in eval mode (running statistics,
    no dropout)."""
    def one(params, state, x, y):
        logits, _ = model.apply(params, state, x, train=False)
        return xent(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

    @jax.jit
    def evaluate(params, state):
        return one(params, state, *train) + one(params, state, *val)
    return evaluate


def run(kind, args, train, val):
    model = make_model(kind, args.width)
    init = jax.jit(lambda k: model.init(k, train[0].shape)[:2])   # one compile, not many ops
    params, state = init(jax.random.PRNGKey(args.seed))
    opt = adam(args.lr)
    opt_state = opt.init(params)
    penalty = l2_penalty(args.l2) if kind == "L2" else (lambda p: 0.0)
    epoch = make_epoch(model, opt, penalty, train, args.batch)
    evaluate = make_eval(model, train, val)
    hist = {k: [] for k in ("train_loss", "val_loss", "train_acc", "val_acc")}
    key = jax.random.PRNGKey(args.seed + 1)
    for e in tqdm(range(args.epochs), desc=f"{kind:>10}", leave=False):
        params, state, opt_state = epoch(params, state, opt_state, jax.random.fold_in(key, e))
        for k, v in zip(("train_loss", "train_acc", "val_loss", "val_acc"),
                        evaluate(params, state)):
            hist[k].append(float(v))
    return hist


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[1].sharey(axes[0])
    for (kind, h), color in zip(results.items(), ("C0", "C1", "C2", "C3")):
        axes[0].plot(h["train_loss"], color=color, label=kind)
        axes[1].plot(h["val_loss"], color=color, label=kind)
        axes[2].plot(h["train_acc"], color=color, ls="--")
        axes[2].plot(h["val_acc"], color=color, label=kind)
    for ax, title in zip(axes, ("training loss", "validation loss",
                                "accuracy (dashed: training, solid: validation)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    axes[0].set_yscale("log")                   # shared with the validation panel
    axes[2].set_ylim(0.8, 1.005)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l2", type=float, default=5e-3, help="λ of the 0.5·λ·Σw² penalty")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="few epochs, narrow net (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.width = min(args.epochs, 10), min(args.width, 64)

    train, val = load(args.n_train, args.seed)
    print(f"digits: {len(train[0])} train / {len(val[0])} validation, MLP 64-{args.width}-"
          f"{args.width}-10, Adam lr {args.lr}, {args.epochs} epochs of batch {args.batch}")
    results, t0 = {}, time.perf_counter()
    for kind in ("none", "dropout", "batch norm", "L2"):
        results[kind] = h = run(kind, args, train, val)
        print(f"{kind:>10}: train acc {h['train_acc'][-1]:.3f}  val acc {h['val_acc'][-1]:.3f}  "
              f"gap {h['train_acc'][-1] - h['val_acc'][-1]:+.3f}   train loss "
              f"{h['train_loss'][-1]:.4f}  val loss {h['val_loss'][-1]:.4f} (best "
              f"{min(h['val_loss']):.4f})  gap {h['val_loss'][-1] - h['train_loss'][-1]:+.4f}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "regularization.png")
    plot(results, path)
    print(f"curves: {path}")
    return results


if __name__ == "__main__":
    main()
