"""The six normalizations on one tensor, and what batch norm does for a badly initialized deep MLP.

The lesson's normalization chapter, in two parts.

1. **What each one averages over.** One tensor ``x: [batch 3, positions 4, channels 6]`` whose
   channels, examples and positions all have different means and scales goes through
   ``BatchNorm`` (training mode), ``LayerNorm``, ``InstanceNorm``, ``GroupNorm(2)`` and
   ``RMSNorm`` (their initial ``scale = 1``, ``offset = 0``); ``WeightNorm`` wraps a
   ``Dense(4)`` and normalizes its kernel instead. Each output's per-group mean and RMS are
   measured under every grouping: each normalizer gives mean 0 and RMS 1 (= std 1) on its own
   groups, and not on the others (RMSNorm: RMS 1, mean untouched).
2. **Training.** A ReLU MLP 64-32-(32 × depth)-10 initialised far too small (weights
   ``normal(0.05)``, a quarter of He's ``√(2/32)``) is trained with SGD + momentum on sklearn's
   digits, plain and with ``BatchNorm`` or ``LayerNorm`` after each hidden ``Dense`` (before the
   ReLU), several seeds, the same init and batches for all three. Each variant is one compiled
   program ``jax.vmap``-ed over seeds; the minibatch indices are drawn in NumPy.

Figures: ``OUT/normalization.png`` (groups and statistics), ``OUT/normalization_training.png``.
``--quick`` (150 steps, 3 seeds) compiles without XLA's backend optimization: faster to compile.

    python examples/normalization.py [--depth 10] [--steps 300] [--seeds 4] [--out out] [--quick]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from fnn import backprop, initializers, losses, optim
from fnn.core import default_dtype
from fnn.layers import (BatchNorm, Dense, GroupNorm, InstanceNorm, LayerNorm, Relu, RMSNorm,
                        WeightNorm, serial, stack)
from fnn.plot import save as save_figure

N, L, C, G = 3, 4, 6, 2                         # the demo tensor [batch, positions, channels]
NORMS = {"BatchNorm": BatchNorm(), "LayerNorm": LayerNorm(), "InstanceNorm": InstanceNorm(),
         f"GroupNorm({G})": GroupNorm(G), "RMSNorm": RMSNorm()}
# which statistics group each element (n, l, c) of x belongs to, per normalizer
GROUPINGS = {"BatchNorm": lambda n, l, c: c,                    # over batch and positions
             "LayerNorm": lambda n, l, c: n * L + l,            # over channels
             "InstanceNorm": lambda n, l, c: n * C + c,         # over positions
             f"GroupNorm({G})": lambda n, l, c: n * G + c // (C // G)}   # over positions × group
OWN = {**{k: k for k in GROUPINGS}, "RMSNorm": "LayerNorm"}
xent = losses.softmax_cross_entropy_with_integer_labels


# --------------------------------------------------------------------------- part 1

def demo_tensor(seed=0):
    """``x[n, l, c] = (c + 1)·z + 2c − 3n + l``, ``z ~ N(0, 1)``: every axis shifts or scales."""
    z = np.random.default_rng(seed).normal(size=(N, L, C))
    n, l, c = np.meshgrid(np.arange(N), np.arange(L), np.arange(C), indexing="ij")
    return jnp.asarray((c + 1) * z + 2 * c - 3 * n + l, default_dtype())


def group_ids(grouping):
    """``[N, L, C]`` integer ids: elements with the same id share a mean and variance."""
    return np.fromfunction(np.vectorize(GROUPINGS[grouping]), (N, L, C), dtype=int)


def normalize_all(x, key):
    """Every normalizer of :data:`NORMS` on ``x`` (BatchNorm with batch statistics) and
    ``WeightNorm(Dense(4))`` on ``x``; one jit. Returns ``(outputs, wn_params, wn_output)``."""
    params = {k: m.init(key, x.shape)[:2] for k, m in NORMS.items()}
    wn = WeightNorm(Dense(4))
    wn_params, wn_state, _ = wn.init(key, x.shape)

    @jax.jit
    def run(params, wn_params, x):
        outs = {k: m.apply(*params[k], x, train=True)[0] for k, m in NORMS.items()}
        return outs, wn.apply(wn_params, wn_state, x)[0]
    outs, wn_out = run(params, wn_params, x)
    return outs, wn_params, wn_out


def group_stats(y, grouping):
    """Per-group ``(mean, rms)`` of ``y`` under ``grouping`` (float64 NumPy)."""
    y, ids = np.asarray(y, np.float64), group_ids(grouping)
    groups = np.unique(ids)
    mean = np.array([y[ids == g].mean() for g in groups])
    rms = np.array([np.sqrt((y[ids == g] ** 2).mean()) for g in groups])
    return mean, rms


def stats_table(x, outs):
    """``{row: {grouping: (max |mean|, max |rms − 1|)}}`` for the input and every output."""
    rows = {"input x": x, **{k: outs[k] for k in NORMS}}
    return {r: {g: tuple(float(np.abs(s).max()) for s in (m, rms - 1))
                for g in GROUPINGS for m, rms in [group_stats(y, g)]} for r, y in rows.items()}


# --------------------------------------------------------------------------- part 2

def digits(n_train=1000, n_val=500, seed=0):
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, va = order[:n_train], order[n_train:n_train + n_val]
    return (x[tr], y[tr]), (x[va], y[va])


def deep_mlp(norm, depth, width, std):
    """``Dense → ReLU → (Dense → [norm] → ReLU) × depth → Dense(10)``, kernels ``normal(std)``;
    the repeated block is one ``stack`` (a ``lax.scan``: compile time does not grow with depth)."""
    init = initializers.normal(std)
    block = [Dense(width, w_init=init)] + ([norm()] if norm else []) + [Relu()]
    body = serial(Dense(width, w_init=init), Relu(), stack(serial(*block), depth))
    return serial(("body", body), ("head", Dense(10, w_init=init)))


def hidden_stats(net, params, state, x):
    """The last hidden layer on ``x`` (batch statistics for BatchNorm): ``(RMS of its
    activations, mean cosine similarity between the examples' activation vectors)``."""
    body = dict(net.children)["body"] if net.children else None
    h, _ = body.apply(params["body"], state["body"], x, train=True)
    u = h / (jnp.linalg.norm(h, axis=1, keepdims=True) + 1e-30)
    cos = u @ u.T
    n = h.shape[0]
    return jnp.sqrt(jnp.mean(h ** 2)), (jnp.sum(cos) - jnp.trace(cos)) / (n * (n - 1))


def train_variant(net, keys, batches, train, val, lr, quick=False):
    """SGD (momentum 0.9) from ``net.init(key)`` for each key on ``batches: [seeds, steps, b]``
    (indices into ``train``); one jit, vmapped over seeds. Returns ``(losses [seeds, steps],
    validation accuracy [seeds], hidden_stats at init on 100 validation digits)``. ``quick``:
    XLA's backend (LLVM) optimization off — compiles faster, runs slower; right for a smoke
    run."""
    (x, y), (xv, yv) = (tuple(jnp.asarray(a) for a in d) for d in (train, val))
    inits = [net.init(k, (batches.shape[-1],) + x.shape[1:])[:2] for k in keys]   # eager: cheap
    params, state = jax.tree.map(lambda *a: jnp.stack(a), *inits)
    vg = backprop.value_and_grad(net, xent)
    opt = optim.sgd(lr, momentum=0.9)

    def one(params, state, idx):
        at_init = hidden_stats(net, params, state, xv[:100])

        def step(carry, i):
            p, s, o = carry
            (value, s), g = vg(p, s, x[i], y[i])
            u, o = opt.update(g, o, p)
            return (optim.apply_updates(p, u), s, o), value
        (p, s, _), vals = jax.lax.scan(step, (params, state, opt.init(params)), idx)
        logits, _ = net.apply(p, s, xv)
        return vals, jnp.mean(jnp.argmax(logits, -1) == yv), at_init
    vals, acc, at_init = jax.jit(jax.vmap(one))(
        params, state, jnp.asarray(batches))
    return (np.asarray(vals, np.float64), np.asarray(acc, np.float64),
            tuple(np.asarray(a, np.float64) for a in at_init))


# --------------------------------------------------------------------------- figures

def plot_groups(x, outs, table, wn_params, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(13, 7))
    gs = fig.add_gridspec(2, 6, height_ratios=(1.3, 1))
    for i, name in enumerate(list(NORMS) + ["WeightNorm"]):
        ax = fig.add_subplot(gs[0, i])
        if name == "WeightNorm":
            v = np.asarray(wn_params["v"])
            ax.set_ylabel("input feature", fontsize=7)
            ax.imshow(np.broadcast_to(np.arange(v.shape[1]), v.shape), cmap="tab10", vmin=0,
                      vmax=9)
            ax.set_title("WeightNorm\nkernel v [in 6, out 4]:\none norm per column", fontsize=8)
            ax.set_xlabel("output unit", fontsize=8)
        else:
            ids = group_ids(OWN[name])
            img = np.concatenate([np.pad(ids[n], ((0, 1), (0, 0)), constant_values=-1)
                                  for n in range(N)], axis=0)[:-1]   # examples one under another
            ax.imshow(np.ma.masked_where(img < 0, img % 20), cmap="tab20", vmin=0, vmax=19)
            ax.set_title(f"{name}\n{len(np.unique(ids))} groups" +
                         (" (RMS only)" if name == "RMSNorm" else ""), fontsize=8)
            ax.set_xlabel("channel", fontsize=7)
            ax.set_ylabel("examples 1, 2, 3 (4 positions each)", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    rows, cols = list(table), list(GROUPINGS)
    for j, (what, label) in enumerate((("mean", "max |mean| per group"),
                                       ("rms", "max |RMS − 1| per group"))):
        ax = fig.add_subplot(gs[1, 3 * j:3 * j + 3])
        m = np.array([[table[r][c][j] for c in cols] for r in rows])
        ax.imshow(np.log10(m + 1e-6), cmap="viridis", vmin=-6, vmax=1.5, aspect="auto")
        for a in range(len(rows)):
            for b in range(len(cols)):
                ax.text(b, a, f"{m[a, b]:.2g}", ha="center", va="center", fontsize=7,
                        color="w" if m[a, b] < 0.1 else "k")
        ax.set_xticks(range(len(cols)), [f"{c}'s groups" for c in cols], fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(f"after each normalizer (rows): {label}, by grouping (columns)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_training(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": (2, 1)})
    for (name, (vals, acc, _)), color in zip(runs.items(), ("C3", "C0", "C2")):
        t = np.arange(vals.shape[1])
        a.plot(t, np.median(vals, 0), color=color, label=name)
        a.fill_between(t, vals.min(0), vals.max(0), color=color, alpha=0.2)
        b.scatter(np.full(len(acc), list(runs).index(name)), acc, color=color)
    a.axhline(np.log(10), color="k", lw=0.6, ls=":")
    a.set_title("training loss per SGD step (median, band: min–max over seeds)", fontsize=9)
    a.set_xlabel("SGD step")
    a.legend(fontsize=8)
    b.set_xticks(range(len(runs)), list(runs), fontsize=8)
    b.set_ylim(0, 1)
    b.axhline(0.1, color="k", lw=0.6, ls=":")
    b.set_title("validation accuracy (one dot per seed)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--std", type=float, default=0.05, help="the poor init's weight std")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="fewer steps and seeds (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = min(args.steps, 150), min(args.seeds, 3)
    key = jax.random.PRNGKey(args.seed)
    x = demo_tensor(args.seed)
    outs, wn_params, wn_out = normalize_all(x, key)
    table = stats_table(x, outs)
    print(f"x: [batch {N}, positions {L}, channels {C}]; max |mean| / max |RMS − 1| per group")
    print(f"  {'':14s}" + "".join(f"{g + ' groups':>24s}" for g in GROUPINGS))
    for r, row in table.items():
        print(f"  {r:14s}" + "".join(f"{m:>12.2g}{s:>12.2g}" for m, s in row.values()))
    w = np.asarray(wn_params["v"]) * np.asarray(wn_params["g"]) / np.linalg.norm(
        np.asarray(wn_params["v"]), axis=0)
    print(f"  WeightNorm(Dense(4)): column norms of w = g·v/‖v‖: "
          f"{np.round(np.linalg.norm(w, axis=0), 4)} = g {np.round(np.asarray(wn_params['g']), 4)}")
    result = {"x": x, "outputs": outs, "table": table, "wn_params": wn_params, "wn_out": wn_out}
    result["figure"] = os.path.join(args.out, "normalization.png")
    plot_groups(x, outs, table, wn_params, result["figure"])

    train, val = digits()
    rng = np.random.default_rng(args.seed)
    batches = rng.integers(0, len(train[0]), (args.seeds, args.steps, args.batch))
    keys = jax.random.split(key, args.seeds)
    print(f"digits: {len(train[0])} train / {len(val[0])} validation; MLP 64-{args.width}-"
          f"({args.width} x {args.depth})-10, weights normal({args.std}); SGD lr {args.lr} "
          f"momentum 0.9, {args.steps} steps of batch {args.batch}, {args.seeds} seeds "
          f"(median [min–max])")
    runs = {}
    for name, norm in (("plain", None), ("BatchNorm", BatchNorm), ("LayerNorm", LayerNorm)):
        vals, acc, (rms, cos) = runs[name] = train_variant(
            deep_mlp(norm, args.depth, args.width, args.std), keys, batches, train, val, args.lr,
            args.quick)
        tail = vals[:, -20:].mean(1)
        result[name] = {"first_loss": vals[:, 0], "last_loss": tail, "val_acc": acc,
                        "init_rms": rms, "init_cos": cos}
        print(f"  {name:10s} loss {np.median(vals[:, 0]):.3f} -> {np.median(tail):.3f} "
              f"[{tail.min():.3f}–{tail.max():.3f}] (mean of the last 20 steps); validation "
              f"accuracy {np.median(acc):.3f} [{acc.min():.3f}–{acc.max():.3f}]")
        print(f"  {'':10s} at init, last hidden layer: RMS {np.median(rms):.2g} [{rms.min():.2g}–"
              f"{rms.max():.2g}], mean cosine between examples {np.median(cos):.3f} "
              f"[{cos.min():.3f}–{cos.max():.3f}]")
    result["training_figure"] = os.path.join(args.out, "normalization_training.png")
    plot_training(runs, result["training_figure"])
    print(f"wrote {result['figure']}, {result['training_figure']}")
    result["runs"] = runs
    return result


if __name__ == "__main__":
    main()
