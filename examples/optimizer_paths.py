"""Optimizer trajectories on 2-D loss surfaces: SGD, momentum, RMSprop, Adam and AdamW.

Each of ``fnn.optim``'s optimizers starts from the same point on two classic surfaces and
takes a fixed number of steps; the paths are drawn over the contours (``OUT/optimizer_paths.png``)
and the final loss and distance to the minimum printed.

- An ill-conditioned quadratic ``f(x, y) = ½(x² + 100y²)``: curvature 100 times larger along
  ``y`` than along ``x``. Plain SGD's rate is capped by the steep direction (``η < 2/100``), so it
  zig-zags across the valley and crawls along it; momentum builds up speed along the valley;
  RMSprop and Adam divide each coordinate by its own gradient scale and head almost straight in.
- Rosenbrock's banana ``f(x, y) = (1 − x)² + 100(y − x²)²``, minimum at ``(1, 1)``, from
  ``(−1.5, 1.5)``: a curved, flat-bottomed valley.

AdamW adds decoupled weight decay ``λθ`` to Adam's step: it pulls the parameters towards 0,
so it settles a little short of the minimum of ``f`` itself — regularisation changes the
objective. Gradients of the surfaces are written by hand (and checked against ``jax.grad`` in
the tests). Everything is deterministic: no data, no random numbers.

    python examples/optimizer_paths.py [--out out] [--quick]
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fnn.optim as optim
from fnn.plot import save as save_figure


def quadratic(p):
    """``½(x² + 100y²)``; minimum 0 at the origin."""
    return 0.5 * (p[0] ** 2 + 100.0 * p[1] ** 2)


def quadratic_grad(p):
    return jnp.stack([p[0], 100.0 * p[1]])


def rosenbrock(p):
    """``(1 − x)² + 100(y − x²)²``; minimum 0 at ``(1, 1)``."""
    return (1 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


def rosenbrock_grad(p):
    x, y = p[0], p[1]
    return jnp.stack([-2 * (1 - x) - 400 * x * (y - x ** 2), 200 * (y - x ** 2)])


SURFACES = {   # name: (f, hand gradient, start, minimum, steps, view box)
    "quadratic": (quadratic, quadratic_grad, (-4.0, 1.5), (0.0, 0.0), 100, (-4.5, 1.0, -2, 2)),
    "rosenbrock": (rosenbrock, rosenbrock_grad, (-1.5, 1.5), (1.0, 1.0), 1500,
                   (-2.0, 1.6, -0.6, 2.6)),
}

RATES = {      # per surface: each optimizer's learning rate, stable for that surface
    "quadratic": {"SGD": 0.018, "Momentum": 0.004, "RMSprop": 0.1, "Adam": 0.3, "AdamW": 0.3},
    "rosenbrock": {"SGD": 1e-3, "Momentum": 2e-4, "RMSprop": 1e-2, "Adam": 5e-2, "AdamW": 5e-2},
}
WEIGHT_DECAY = 0.1


def optimizers(rates):
    """The five optimizers of the lesson, built from ``fnn.optim`` with ``rates[name]``."""
    return {"SGD": optim.sgd(rates["SGD"]),
            "Momentum": optim.sgd(rates["Momentum"], momentum=0.9),
            "RMSprop": optim.rmsprop(rates["RMSprop"]),
            "Adam": optim.adam(rates["Adam"]),
            "AdamW": optim.adamw(rates["AdamW"], weight_decay=WEIGHT_DECAY)}


def path(opt, grad, start, steps):
    """``steps`` updates of ``opt`` from ``start``; **returns** the points ``[steps + 1, 2]``."""
    def step(carry, _):
        p, s = carry
        updates, s = opt.update(grad(p), s, p)
        p = optim.apply_updates(p, updates)
        return (p, s), p
    _, points = jax.lax.scan(step, (start, opt.init(start)), None, length=steps)
    return jnp.concatenate([start[None, :], points])


@partial(jax.jit, static_argnames=("surface", "steps"))
def all_paths(surface, steps):
    """Every optimizer's path on one surface (one compilation for all five)."""
    _, grad, start, _, _, _ = SURFACES[surface]
    start = jnp.asarray(start, jnp.zeros(()).dtype)
    return {k: path(o, grad, start, steps) for k, o in optimizers(RATES[surface]).items()}


def plot(paths, path_out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (surface, ps) in zip(axes, paths.items()):
        f, _, start, minimum, _, (x0, x1, y0, y1) = SURFACES[surface]
        gx, gy = np.meshgrid(np.linspace(x0, x1, 120), np.linspace(y0, y1, 120))
        z = np.asarray(f(np.stack([gx, gy])))
        ax.contour(gx, gy, np.log10(z + 1e-3), levels=12, colors="0.6", linewidths=0.5)
        for name, pts in ps.items():
            pts = np.asarray(pts)
            line, = ax.plot(pts[:, 0], pts[:, 1], "-", lw=1.3, label=name, alpha=0.9)
            ax.plot(*pts[-1], "o", color=line.get_color(), ms=6, mec="k")     # where it ended
        ax.plot(*minimum, "k*", ms=12)
        ax.plot(*start, "ko", ms=5)
        steps = len(next(iter(ps.values()))) - 1
        ax.set(xlim=(x0, x1), ylim=(y0, y1), title=f"{surface}: {steps} steps", xlabel="x",
               ylabel="y")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path_out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--seed", type=int, default=0, help="unused: the runs are deterministic")
    ap.add_argument("--quick", action="store_true",
                    help="accepted for the common command line: the default takes seconds")
    args = ap.parse_args(argv)

    paths, results = {}, {}
    for surface, (f, _, _, minimum, steps, _) in SURFACES.items():
        found = all_paths(surface, steps)
        paths[surface] = {k: np.asarray(found[k]) for k in RATES[surface]}    # lesson order
        print(f"{surface}: {steps} steps from {SURFACES[surface][2]}; minimum at {minimum}")
        print(f"  {'optimizer':10s} {'rate':>7s} {'final loss':>11s} {'distance to min':>16s}")
        results[surface] = {}
        for name, pts in paths[surface].items():
            loss = float(f(jnp.asarray(pts[-1])))
            dist = float(np.linalg.norm(pts[-1] - np.asarray(minimum)))
            results[surface][name] = {"loss": loss, "distance": dist}
            print(f"  {name:10s} {RATES[surface][name]:7g} {loss:11.2e} {dist:16.2e}")
    out = os.path.join(args.out, "optimizer_paths.png")
    plot(paths, out)
    print(f"figure -> {out}")
    return {"paths": paths, "results": results, "figure": out}


if __name__ == "__main__":
    main()
