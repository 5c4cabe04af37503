"""Gradient clipping on an exploding RNN: the same SGD run with no clipping, by value, by global norm.

The lesson's gradient-clipping section. A SimpleRNN whose recurrent weights are orthogonal times
a gain of 3 is trained to output the running mean of its input over 30 steps (MSE, plain SGD
at lr 0.2). Backpropagation through time multiplies the error by ``wh·diag(tanh')`` per step, so the
gradient can be huge; one such step throws the weights far away. Three runs from the same init
on the same batches: no clipping; ``clip_by_value(1)`` (each component into ``[-1, 1]`` — it
changes the gradient's direction); ``clip_by_global_norm(1)`` (the whole gradient rescaled to
norm ≤ 1 when larger — the direction kept). Each step's raw gradient norm and loss are recorded
for several seeds (``jax.vmap``); the final loss (median over seeds) and the largest raw
gradient norm are printed. Figure: ``OUT/gradient_clipping.png``.

    python examples/gradient_clipping.py [--steps 300] [--seeds 4] [--out out] [--quick]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, initializers, losses, optim
from fnn.layers import Dense, SimpleRNN, serial

BATCH, T, HIDDEN, GAIN = 32, 30, 32, 3.0
CLIPS = {"no clipping": optim.identity,
         "clip_by_value(1)": lambda: optim.clip_by_value(1.0),
         "clip_by_global_norm(1)": lambda: optim.clip_by_global_norm(1.0)}


def batch(key, t=T):
    """``x: [BATCH, t, 1]`` uniform in [-1, 1]; target: the running mean ``[BATCH, t, 1]``."""
    x = jax.random.uniform(key, (BATCH, t, 1), minval=-1.0, maxval=1.0)
    return x, jnp.cumsum(x, axis=1) / jnp.arange(1, t + 1)[None, :, None]


def model():
    return serial(SimpleRNN(HIDDEN, wh_init=initializers.orthogonal(GAIN)), Dense(1))


def train(clip, keys, steps, lr):
    """SGD with optional clipping, one model per key (vmapped); returns per-step ``(losses,
    raw gradient norms)``, each ``[seeds, steps]``."""
    net = model()
    opt = optim.chain(clip, optim.sgd(lr))
    vg = backprop.value_and_grad(net, losses.mse)

    def one(key):
        params, state, _ = net.init(key, (BATCH, T, 1))

        def step(carry, i):
            params, opt_state = carry
            x, y = batch(jax.random.fold_in(key, i))
            (value, _), grads = vg(params, state, x, y)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optim.apply_updates(params, updates), opt_state), (value,
                                                                         optim.global_norm(grads))
        _, (vals, norms) = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return vals, norms
    vals, norms = jax.jit(jax.vmap(one))(keys)
    return np.asarray(vals), np.asarray(norms)


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (name, (vals, norms)), color in zip(runs.items(), ("C3", "C1", "C0")):
        for i in range(len(vals)):
            lab = name if i == 0 else None
            a.semilogy(np.where(np.isfinite(norms[i]), norms[i], np.nan), color=color, lw=0.7,
                       alpha=0.7, label=lab)
            b.semilogy(np.where(np.isfinite(vals[i]), vals[i], np.nan), color=color, lw=0.7,
                       alpha=0.7, label=lab)
    a.set_title("raw gradient norm per step (one line per seed)")
    b.set_title("training loss (MSE)")
    for ax in (a, b):
        ax.set_xlabel("SGD step")
        ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="few steps, 2 seeds (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = min(args.steps, 60), min(args.seeds, 2)
    keys = jax.random.split(jax.random.PRNGKey(args.seed), args.seeds)
    runs, result = {}, {}
    print(f"SimpleRNN({HIDDEN}), recurrent gain {GAIN}, running mean of {T} steps, SGD lr "
          f"{args.lr}, {args.steps} steps, {args.seeds} seeds")
    for name, make in CLIPS.items():
        runs[name] = vals, norms = train(make(), keys, args.steps, args.lr)
        final = np.where(np.isfinite(vals[:, -1]), vals[:, -1], np.inf)
        result[name] = {"first_loss": vals[:, 0].tolist(), "final_loss": final.tolist(),
                        "max_grad_norm": float(np.nanmax(
            np.where(np.isfinite(norms), norms, np.nan)))}
        print(f"  {name:24s} loss {np.median(vals[:, 0]):.3g} -> median {np.median(final):.3g} (seeds {final.min():.3g}"
              f"–{final.max():.3g}); largest raw gradient norm {result[name]['max_grad_norm']:.3g}")
    path = os.path.join(args.out, "gradient_clipping.png")
    plot(runs, path)
    print(f"wrote {path}")
    result["figure"], result["runs"] = path, runs
    return result


if __name__ == "__main__":
    main()
