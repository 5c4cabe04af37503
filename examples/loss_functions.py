"""Losses side by side: MSE, MAE and Huber on data with outliers; cross-entropy's penalty.

Part 1: a line ``y = 2x + 1`` plus small noise, with 10% of the points (all on the right half)
pushed far up — outliers. A ``Dense(1)`` is fitted to it three times, minimising MSE, MAE and
Huber (δ = 1) with fnn's hand-derived loss gradients, ``fnn.backprop`` and Adam on a cosine
schedule. The squared error lets the outliers drag the line; MAE and Huber, whose gradients
are bounded, stay near the true slope. Repeated over ``--seeds`` data sets; each loss's slope
error is printed (median and range).

Part 2: for a positive example (``y = 1``) predicted with probability ``p``, binary
cross-entropy ``−log p`` grows without bound as ``p → 0`` and its gradient with respect to the
logit stays ``p − 1 ≈ −1``; the squared error through a sigmoid is bounded by 1 and its
gradient ``2(p − 1)·p(1 − p)`` vanishes exactly when the model is confidently wrong. A table
and ``OUT/loss_functions.png`` show both parts.

    python examples/loss_functions.py [--n 200] [--seeds 5] [--seed 0] [--steps 1500] [--out out]
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fnn.optim as optim
from fnn import backprop, losses
from fnn.activations import sigmoid
from fnn.layers import Dense
from fnn.plot import save as save_figure

LOSSES = {"MSE": losses.mse, "MAE": losses.mae, "Huber(δ=1)": losses.huber(1.0)}
TRUE_SLOPE, TRUE_INTERCEPT = 2.0, 1.0
MODEL = Dense(1)


def make_data(n, seed, outlier_fraction=0.1):
    """``x ~ U(−1, 1)``, ``y = 2x + 1 + 0.2·ε``; a tenth of the ``x > 0`` points get +6 to +10.

    **Returns:** ``(x: [n, 1], y: [n, 1], is_outlier: [n] bool)`` as NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    y = TRUE_SLOPE * x + TRUE_INTERCEPT + 0.2 * rng.standard_normal(n)
    right = np.flatnonzero(x > 0)
    out = rng.choice(right, size=int(outlier_fraction * n), replace=False)
    y[out] += rng.uniform(6, 10, out.size)
    return x[:, None], y[:, None], np.isin(np.arange(n), out)


@partial(jax.jit, static_argnames=("loss", "steps"))
def fit_line(x, y, loss, steps):
    """Minimise ``loss(Dense(1)(x), y)`` from zero weights: Adam, cosine-annealed rate 0.1 → 0.

    **Returns:** ``(slope, intercept)``.
    """
    params = {"w": jnp.zeros((1, 1), x.dtype), "b": jnp.zeros((1,), x.dtype)}
    opt = optim.adam(optim.schedules.cosine_annealing(0.1, steps))
    vg = backprop.value_and_grad(MODEL, loss)

    def step(carry, _):
        params, opt_state = carry
        (_, _), grads = vg(params, {}, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optim.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params["w"][0, 0], params["b"][0]


def confident_mistakes(ps=(0.5, 0.1, 0.01, 0.001)):
    """For ``y = 1`` predicted as ``p = σ(z)``: both losses and their gradients w.r.t. ``z``."""
    p = jnp.asarray(ps, jnp.zeros(()).dtype)[:, None]
    z = jnp.log(p) - jnp.log1p(-p)                              # logit, so σ(z) = p
    one = jnp.ones_like(p)
    col = lambda a: np.asarray(a[:, 0])
    each = {"reduction": "none"}                    # per example, not the batch mean
    return {"p": col(p), "bce": col(losses.binary_cross_entropy(p, one, **each)),
            "mse": col(losses.mse(p, one, **each)),
            "bce_dz": col(losses.sigmoid_binary_cross_entropy.grad(z, one, **each)),
            "mse_dz": col(losses.mse.grad(p, one, **each) * sigmoid.grad(z))}


def plot(data, fits, table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, y, out = data
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.9))
    ax[0].scatter(x[~out, 0], y[~out, 0], s=8, c="grey", label="data")
    ax[0].scatter(x[out, 0], y[out, 0], s=14, c="k", marker="x", label="outliers")
    g = np.linspace(-1, 1, 2)
    ax[0].plot(g, TRUE_SLOPE * g + TRUE_INTERCEPT, "k--", lw=1, label="true line")
    for name, (a, b) in fits.items():
        ax[0].plot(g, a * g + b, lw=2, label=f"{name}: slope {a:.2f}")
    ax[0].set(title="fitted lines (first seed)", xlabel="x", ylabel="y")
    ax[0].legend(fontsize=7)
    r = jnp.linspace(-3, 3, 301)[:, None]
    zero = jnp.zeros_like(r)
    for name, loss in LOSSES.items():
        ax[1].plot(r[:, 0], loss(r, zero, reduction="none")[:, 0], label=name)
    ax[1].set(title="loss of one residual r = ŷ − y", xlabel="r", ylim=(0, 4.5))
    ax[1].legend(fontsize=8)
    p = np.linspace(0.001, 0.999, 500)
    ax[2].plot(p, -np.log(p), label="cross-entropy −log p")
    ax[2].plot(p, (1 - p) ** 2, label="squared error (1 − p)²")
    ax[2].scatter(table["p"], table["bce"], s=12, c="C0")
    ax[2].set(title="penalty for a positive example (y = 1)",
              xlabel="predicted probability p of the true class", ylim=(0, 7))
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=5, help="data sets drawn")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="n 100, 2 seeds, 600 steps")
    args = ap.parse_args(argv)
    n, n_seeds, steps = (100, 2, 600) if args.quick else (args.n, args.seeds, args.steps)
    dtype = jnp.zeros(()).dtype

    datasets = [make_data(n, s) for s in range(args.seed, args.seed + n_seeds)]
    xs = jnp.asarray(np.stack([d[0] for d in datasets]), dtype)        # (seeds, n, 1)
    ys = jnp.asarray(np.stack([d[1] for d in datasets]), dtype)
    fits = {}
    for name, loss in LOSSES.items():
        a, b = jax.vmap(lambda x, y: fit_line(x, y, loss, steps))(xs, ys)
        fits[name] = (np.asarray(a), np.asarray(b))
    print(f"y = {TRUE_SLOPE:g}x + {TRUE_INTERCEPT:g} + noise, n = {n}, 10% outliers (+6 to +10, "
          f"x > 0), {n_seeds} data sets; |fitted slope − {TRUE_SLOPE:g}|:")
    errors = {k: np.abs(a - TRUE_SLOPE) for k, (a, _) in fits.items()}
    for name, e in errors.items():
        print(f"  {name:11s} median {np.median(e):.3f}   range {e.min():.3f} to {e.max():.3f}")

    table = confident_mistakes()
    print("\na positive example (y = 1) predicted with probability p = σ(z):")
    print(f"  {'p':>6} {'BCE −log p':>11} {'MSE (1−p)²':>11} {'∂BCE/∂z':>9} {'∂MSE/∂z':>9}")
    for i, p in enumerate(table["p"]):
        print(f"  {p:>6g} {table['bce'][i]:>11.3f} {table['mse'][i]:>11.3f} "
              f"{table['bce_dz'][i]:>9.3f} {table['mse_dz'][i]:>9.4f}")

    path = os.path.join(args.out, "loss_functions.png")
    plot(datasets[0], {k: (float(a[0]), float(b[0])) for k, (a, b) in fits.items()}, table, path)
    print(f"figure -> {path}")
    return {"data": datasets, "fits": fits, "slope_errors": errors, "table": table,
            "figure": path}


if __name__ == "__main__":
    main()
