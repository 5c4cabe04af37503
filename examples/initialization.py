"""Weight initialization: activation statistics layer by layer through a deep network.

A stack of ``--depth`` ``Dense(width)`` layers (no bias) is built with each of five kernel
initializers from ``fnn.initializers`` — too small ``normal(0.01)``, too large ``normal(1)``,
Xavier/Glorot (``glorot_normal``, variance ``2/(n_in + n_out)``), He (``he_normal``, variance
``2/n_in``) and ``orthogonal`` (gain √2 before ReLU, 1 before tanh) — once with ReLU and once
with tanh activations. A batch of unit-Gaussian inputs goes through; the standard deviation of
every layer's activations is printed and plotted (``OUT/initialization.png``), median over
``--seeds`` draws. For tanh the fraction of saturated units (``|a| > 0.99``) is printed too:
a too-large init keeps tanh's std near 1 only because almost every unit is pinned at ±1.

    python examples/initialization.py [--depth 20] [--width 100] [--seeds 5] [--seed 0] [--out out]
"""
from __future__ import annotations

import argparse
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn import initializers as I
from fnn.layers import Dense, Relu, Tanh, serial
from fnn.plot import save as save_figure

ACTIVATIONS = {"relu": (Relu, math.sqrt(2.0)), "tanh": (Tanh, 1.0)}   # orthogonal gain


def inits(activation):
    """The five initializers compared (orthogonal's gain matched to the activation)."""
    return {"N(0, 0.01²)": I.normal(0.01), "N(0, 1)": I.normal(1.0),
            "Xavier": I.glorot_normal(), "He": I.he_normal(),
            "orthogonal": I.orthogonal(ACTIVATIONS[activation][1])}


def deep_net(w_init, activation, depth, width):
    act = ACTIVATIONS[activation][0]
    layers = []
    for _ in range(depth):
        layers += [Dense(width, w_init=w_init, use_bias=False), act()]
    return serial(*layers)


def layer_stats(model, params, state, x):
    """Std of the input and of each activation layer's output, and the saturated fraction
    ``mean(|a| > 0.99)`` (meaningful for tanh). **Returns:** ``(std: [depth + 1],
    saturated: [depth])`` arrays."""
    std, sat, a = [jnp.std(x)], [], x
    for n, layer in model.children:
        a, _ = layer.apply(params[n], state[n], a)
        if not layer.name.startswith("Dense"):
            std.append(jnp.std(a))
            sat.append(jnp.mean(jnp.abs(a) > 0.99))
    return jnp.stack(std), jnp.stack(sat)


def run(activation, depth, width, batch, seeds):
    """Every initializer, every seed (eager: no compilation, each op runs once).

    **Returns:** ``{init name: (std: [seeds, depth + 1], saturated: [seeds, depth])}`` and
    ``{init name: (model, params, state, x)}`` of the first seed.
    """
    dtype = jnp.zeros(()).dtype
    stats, nets = {}, {}
    for name, w_init in inits(activation).items():
        model = deep_net(w_init, activation, depth, width)
        rows = []
        for s in seeds:
            kx, kp = jax.random.split(jax.random.PRNGKey(s))
            x = jax.random.normal(kx, (batch, width), dtype)
            params, state, _ = model.init(kp, x.shape)
            rows.append(layer_stats(model, params, state, x))
            nets.setdefault(name, (model, params, state, x))
        stats[name] = tuple(np.stack([np.asarray(r[i]) for r in rows]) for i in (0, 1))
    return stats, nets


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (activation, (stats, _)) in zip(axes, results.items()):
        for name, (std, _) in stats.items():
            ax.semilogy(np.arange(std.shape[1]), np.median(std, 0), "o-", ms=3, label=name)
        ax.set(title=f"{activation} network", xlabel="layer (0 = input)",
               ylabel="std of the activations")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="2 seeds")
    args = ap.parse_args(argv)
    width, batch, n_seeds = args.width, args.batch, (2 if args.quick else args.seeds)
    seeds = range(args.seed, args.seed + n_seeds)

    results = {a: run(a, args.depth, width, batch, seeds) for a in ACTIVATIONS}
    print(f"{args.depth} layers of width {width}, batch {batch}, {n_seeds} seeds (median; "
          f"std of the input is 1)")
    for activation, (stats, _) in results.items():
        print(f"\n{activation}: std of the activations after layer 1, 5, 10, {args.depth}"
              + ("; saturated |a| > 0.99 at the last layer" if activation == "tanh" else ""))
        for name, (std, sat) in stats.items():
            med = np.median(std, 0)
            row = "  ".join(f"{med[l]:9.2e}" for l in (1, 5, 10, args.depth))
            extra = f"   {np.median(sat[:, -1]):5.0%}" if activation == "tanh" else ""
            print(f"  {name:12s} {row}{extra}")
    print(f"\nrelu: std after layer {args.depth} / std after layer 1, range over the seeds")
    for name, (std, _) in results["relu"][0].items():
        r = std[:, args.depth] / std[:, 1]
        print(f"  {name:12s} {r.min():9.2e} to {r.max():9.2e}")
    path = os.path.join(args.out, "initialization.png")
    plot(results, path)
    print(f"figure -> {path}")
    return {"depth": args.depth, "results": results, "figure": path}


if __name__ == "__main__":
    main()
