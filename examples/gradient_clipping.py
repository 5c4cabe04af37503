"""Gradient clipping on an exploding RNN: the same SGD run with no clipping, by value, by global norm.

The lesson's gradient-clipping section. A SimpleRNN whose recurrent weights are orthogonal times
a gain of 2 is trained to output the running mean of its input over 30 steps (MSE, plain SGD
at lr 0.5). Backpropagation through time multiplies the error by ``wh·diag(tanh')`` per step,
so the gradient can be huge; one such step throws the weights far away. Three runs from the
same init on the same batches: no clipping; ``clip_by_value(1)`` (each component into
``[-1, 1]`` — it changes the gradient's direction and still allows a step of norm ``lr·√n``);
``clip_by_global_norm(1)`` (the whole gradient rescaled to norm ≤ 1 when larger — the direction
kept, the step at most ``lr``). Each step's raw gradient norm and loss are recorded for several
seeds. All runs are one compiled program, ``jax.vmap``-ed over clipping mode and seed: the three
modes are ``chain(clip_by_value(v), clip_by_global_norm(c), sgd(lr))`` with ``v``/``c`` numbers
(``inf`` = off). The loss is reported as the mean over the last 10 steps (one SGD step is noisy),
its median and range over seeds. Figure: ``OUT/gradient_clipping.png``.

    python examples/gradient_clipping.py [--steps 200] [--seeds 8] [--out out] [--quick]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, initializers, losses, optim
from fnn.layers import Dense, SimpleRNN, serial
from fnn.plot import save as save_figure

BATCH, T, HIDDEN, GAIN, LAST = 32, 30, 32, 2.0, 10
INF = float("inf")
CLIPS = {"no clipping": (INF, INF),              # (value limit, global-norm limit)
         "clip_by_value(1)": (1.0, INF),
         "clip_by_global_norm(1)": (INF, 1.0)}


def batch(key, t=T):
    """``x: [BATCH, t, 1]`` uniform in [-1, 1]; target: the running mean ``[BATCH, t, 1]``."""
    x = jax.random.uniform(key, (BATCH, t, 1), minval=-1.0, maxval=1.0)
    return x, jnp.cumsum(x, axis=1) / jnp.arange(1, t + 1)[None, :, None]


def model():
    return serial(SimpleRNN(HIDDEN, wh_init=initializers.orthogonal(GAIN)), Dense(1))


def train(keys, limits, steps, lr):
    """SGD after ``clip_by_value(v)`` and ``clip_by_global_norm(c)``, one run per (limits, key):
    ``limits: [modes, 2]`` rows ``(v, c)``, ``keys: [seeds, 2]``. One jit, vmapped twice.
    Returns per-step ``(losses, raw gradient norms)``, each ``[modes, seeds, steps]``."""
    net = model()
    vg = backprop.value_and_grad(net, losses.mse)

    def one(key, limit):
        opt = optim.chain(optim.clip_by_value(limit[0]), optim.clip_by_global_norm(limit[1]),
                          optim.sgd(lr))
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
    run = jax.jit(jax.vmap(jax.vmap(one, (0, None)), (None, 0)))
    vals, norms = run(keys, jnp.asarray(limits, dtype=jnp.result_type(float)))
    return np.asarray(vals), np.asarray(norms)


def last_mean(vals, last=LAST):
    """The mean loss over the last ``last`` steps per seed; ``inf`` once any of them is not
    finite (the run overflowed)."""
    tail = np.asarray(vals[..., -last:], dtype=np.float64)
    return np.where(np.isfinite(tail).all(-1), tail.mean(-1), np.inf)


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
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="60 steps, 4 seeds (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = min(args.steps, 60), min(args.seeds, 4)
    keys = jax.random.split(jax.random.PRNGKey(args.seed), args.seeds)
    print(f"SimpleRNN({HIDDEN}), recurrent gain {GAIN}, running mean of {T} steps, SGD lr "
          f"{args.lr}, {args.steps} steps, {args.seeds} seeds; loss = mean of the last {LAST} "
          f"steps, median [min–max] over seeds")
    vals, norms = train(keys, list(CLIPS.values()), args.steps, args.lr)
    runs, result = {}, {}
    for m, name in enumerate(CLIPS):
        runs[name] = vals[m], norms[m]
        first, end = np.asarray(vals[m, :, 0], np.float64), last_mean(vals[m])
        finite = norms[m][np.isfinite(norms[m])]
        result[name] = {"first_loss": first, "last_loss": end,
                        "max_grad_norm": float(finite.max()) if finite.size else np.inf}
        print(f"  {name:24s} loss {np.median(first):.3g} -> {np.median(end):.3g} "
              f"[{end.min():.3g}–{end.max():.3g}]; largest finite raw gradient norm "
              f"{result[name]['max_grad_norm']:.3g}")
    path = os.path.join(args.out, "gradient_clipping.png")
    plot(runs, path)
    print(f"wrote {path}")
    result["figure"], result["runs"] = path, runs
    return result


if __name__ == "__main__":
    main()
