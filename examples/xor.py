"""XOR: the perceptron fails, a two-layer network solves it.

The lesson's first story. A single perceptron draws one straight line, so on XOR it gets at
most 3 of the 4 points right (75%) however long it trains; a 2-4-1 tanh network trained by
full-batch gradient descent on the MSE (fnn's hand-derived backward) gets all four. The MLP is
trained from several random initialisations (one per seed) in one vmapped, jitted run, and the
script reports how many of them reach 100%. Decision boundaries go to ``OUT/xor.png``.

    python examples/xor.py [--out out] [--steps 2000] [--seeds 10] [--seed 0] [--quick]
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, losses
from fnn.initializers import glorot_normal
from fnn.layers import Dense, Sigmoid, Tanh, serial
from fnn.perceptron import perceptron_fit, perceptron_predict
from fnn.plot import save as save_figure

X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y = np.array([0, 1, 1, 0])
MODEL = serial(Dense(4, w_init=glorot_normal()), Tanh(), Dense(1, w_init=glorot_normal()),
               Sigmoid())


@partial(jax.jit, static_argnames=("steps",))
def _train(params, x, target, lr, steps):
    """``steps`` full-batch gradient-descent steps; returns the params and the loss curve."""
    vg = backprop.value_and_grad(MODEL, losses.mse)
    state = {n: {} for n in params}

    def step(params, _):
        (loss, _), grads = vg(params, state, x, target)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss
    return jax.lax.scan(step, params, None, length=steps)


def train_mlps(seeds, steps, lr):
    """One 2-4-1 MLP per seed, trained side by side (``vmap`` over the stacked params).

    **Returns:** ``(params, curves)``: params with a leading seed axis, ``curves: [seeds, steps]``.
    """
    dtype = jnp.zeros(()).dtype
    x = jnp.asarray(X, dtype)
    inits = [MODEL.init(jax.random.PRNGKey(s), x.shape)[0] for s in seeds]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *inits)
    target = jnp.asarray(Y[:, None], dtype)
    return jax.vmap(_train, in_axes=(0, None, None, None, None))(stacked, x, target, lr, steps)


def predict(params, x):
    """``P(class 1)`` of one MLP at ``x: [n, 2]`` → ``[n]``."""
    return MODEL.apply(params, {n: {} for n in params}, x)[0][:, 0]


def plot(pparams, params, p_acc, m_acc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = np.linspace(-0.5, 1.5, 150)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.8))
    for ax, title, z in [
            (axes[0], f"perceptron: {p_acc:.0%}", perceptron_predict(pparams, jnp.asarray(grid))),
            (axes[1], f"2-4-1 MLP, first seed: {m_acc:.0%}", predict(params, jnp.asarray(grid)))]:
        z = np.asarray(z, float).reshape(150, 150)
        ax.contourf(g, g, z, levels=20, cmap="RdBu_r", alpha=0.7)
        ax.contour(g, g, z, levels=[0.5], colors="k", linewidths=1)
        ax.scatter(X[:, 0], X[:, 1], c=Y, cmap="RdBu_r", edgecolors="k", s=120)
        ax.set(title=title, xlabel="x₁", ylabel="x₂")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=10, help="MLPs trained, one per seed")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="3 seeds, 1000 steps")
    args = ap.parse_args(argv)
    steps, n_seeds = (1000, 3) if args.quick else (args.steps, args.seeds)

    pparams, mistakes = perceptron_fit(X, Y, epochs=100)
    p_acc = float(jnp.mean(perceptron_predict(pparams, jnp.asarray(X)) == Y))
    print(f"perceptron: accuracy {p_acc:.0%} after 100 epochs "
          f"({int(mistakes[-1])} mistakes in the last epoch: it never converges on XOR)")

    seeds = list(range(args.seed, args.seed + n_seeds))
    params, curves = train_mlps(seeds, steps, args.lr)
    x = jnp.asarray(X, jnp.zeros(()).dtype)
    probs = np.asarray(jax.vmap(predict, in_axes=(0, None))(params, x))     # (seeds, 4)
    accs = ((probs > 0.5) == Y[None, :]).mean(axis=1)
    print(f"2-4-1 MLP:  {int(np.sum(accs == 1))} of {n_seeds} seeds reach 100% after {steps} "
          f"gradient-descent steps; final MSE {float(curves[:, -1].min()):.4f} to "
          f"{float(curves[:, -1].max()):.4f}")
    print(f"            seed {seeds[0]} outputs "
          f"[{', '.join(f'{p:.3f}' for p in probs[0])}] for y = {Y.tolist()}")

    path = os.path.join(args.out, "xor.png")
    first = jax.tree.map(lambda a: a[0], params)
    plot(pparams, first, p_acc, float(accs[0]), path)
    print(f"decision boundaries -> {path}")
    return {"perceptron_accuracy": p_acc, "perceptron_params": pparams,
            "perceptron_mistakes": np.asarray(mistakes), "seeds": seeds,
            "mlp_accuracy": accs.tolist(), "mlp_probs": probs, "mlp_params": params,
            "mlp_final_mse": np.asarray(curves[:, -1]), "figure": path}


if __name__ == "__main__":
    main()
