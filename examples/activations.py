"""Activation functions, their hand-derived derivatives, and the vanishing gradient.

Part 1: every elementwise activation in ``fnn.activations`` with its derivative ``f.grad``
(written by hand), plotted on ``[-4, 4]`` (``OUT/activations.png``), and checked against
``jax.grad`` of the function on a grid: the largest difference is printed.

Part 2: why sigmoid fell out of hidden layers. The same deep MLP (``--depth`` Dense layers of
width ``--width``, a linear output, MSE to a random target) is built three times, with sigmoid,
tanh (both Glorot-initialised) and ReLU (He). One backward pass through fnn's hand-derived
rules gives ``‖∂L/∂W⁽ˡ⁾‖`` for every layer; sigmoid's ``σ′ ≤ 0.25`` multiplies the gradient
at every layer it passes, so it shrinks geometrically towards the input, while tanh and ReLU
keep it within a small factor. Repeated over ``--seeds`` initialisations; the ratio of the
first layer's gradient norm to the last hidden layer's is printed (median and range) and the
norms per layer are plotted in ``OUT/vanishing_gradient.png``.

    python examples/activations.py [--depth 20] [--width 64] [--seeds 5] [--seed 0] [--out out]
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, losses, plot
from fnn import activations as A
from fnn.initializers import glorot_uniform, he_normal
from fnn.layers import Dense, Relu, Sigmoid, Tanh, serial
from fnn.plot import save as save_figure

CHECKED = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "swish", "softplus")
PLOTTED = CHECKED[:-1]
STACKS = {"sigmoid": (Sigmoid, glorot_uniform), "tanh": (Tanh, glorot_uniform),
          "relu": (Relu, he_normal)}


def grad_vs_autodiff(names=CHECKED, lo=-6.0, hi=6.0, n=1201):
    """``max |f.grad(z) − jax.grad(f)(z)|`` over a grid (``z = 0`` left out: ReLU's kink)."""
    z = np.linspace(lo, hi, n)
    z = jnp.asarray(z[np.abs(z) > 1e-9], jnp.zeros(()).dtype)

    @jax.jit                                         # one compilation for all of them
    def gaps(z):
        fs = [getattr(A, name) for name in names]
        return [jnp.max(jnp.abs(f.grad(z) - jax.vmap(jax.grad(f))(z))) for f in fs]
    return {name: float(g) for name, g in zip(names, gaps(z))}


def deep_mlp(activation, depth, width):
    """``depth`` × (Dense(width) → activation), then Dense(1): the activation's own init."""
    act, init = STACKS[activation]
    layers = []
    for _ in range(depth):
        layers += [Dense(width, w_init=init()), act()]
    return serial(*layers, Dense(1, w_init=glorot_uniform()))


def layer_grad_norms(activation, depth, width, batch, seeds):
    """``‖∂L/∂W⁽ˡ⁾‖`` of the hidden layers ``l = 1 … depth``, one row per seed (fnn.backprop:
    the hand rules, compiled once per activation). **Returns:** ``(norms: [seeds, depth],
    (model, params, state, x, y) of the first seed)``."""
    model = deep_mlp(activation, depth, width)
    grad = jax.jit(backprop.grad(model, losses.mse))
    dtype = jnp.zeros(()).dtype
    rows, first = [], None
    for seed in seeds:
        kx, ky, kp = jax.random.split(jax.random.PRNGKey(seed), 3)
        x = jax.random.normal(kx, (batch, width), dtype)
        y = jax.random.normal(ky, (batch, 1), dtype)
        params, state, _ = model.init(kp, x.shape)
        grads = grad(params, state, x, y)
        rows.append([float(jnp.linalg.norm(grads[str(2 * l)]["w"])) for l in range(depth)])
        first = first or (model, params, state, x, y)
    return np.array(rows), first


def plot_norms(norms, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in norms.items():
        layers = np.arange(1, runs.shape[1] + 1)
        line, = ax.semilogy(layers, np.median(runs, 0), "o-", ms=3, label=name)
        ax.fill_between(layers, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="hidden layer l (1 = next to the input)", ylabel="‖∂L/∂W⁽ˡ⁾‖ (Frobenius)",
           title=f"gradient norm per layer at init ({runs.shape[0]} seeds: median and range)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="depth 10, width 16, 2 seeds")
    args = ap.parse_args(argv)
    depth, width, batch, n_seeds = ((10, 16, 16, 2) if args.quick else
                                    (args.depth, args.width, args.batch, args.seeds))

    check = grad_vs_autodiff()
    print("hand-derived f.grad vs jax.grad on [-6, 6]: max |difference|")
    print("  " + "  ".join(f"{k} {v:.1e}" for k, v in check.items()))
    fig1 = plot.activations(PLOTTED, os.path.join(args.out, "activations.png"))

    seeds = range(args.seed, args.seed + n_seeds)
    norms, ratios, last = {}, {}, {}
    for name in STACKS:
        norms[name], last[name] = layer_grad_norms(name, depth, width, batch, seeds)
        ratios[name] = norms[name][:, 0] / norms[name][:, -1]
    print(f"\n{depth} hidden layers of width {width}, batch {batch}, {n_seeds} seeds: "
          f"‖∂L/∂W⁽¹⁾‖ / ‖∂L/∂W⁽{depth}⁾‖ (first layer over last hidden layer)")
    for name, r in ratios.items():
        print(f"  {name:8s} median {np.median(r):.1e}   range {r.min():.1e} to {r.max():.1e}")
    fig2 = os.path.join(args.out, "vanishing_gradient.png")
    plot_norms(norms, fig2)
    print(f"figures -> {fig1}, {fig2}")
    return {"grad_check": check, "depth": depth, "norms": norms, "ratios": ratios,
            "first_seed_models": last, "figures": [fig1, fig2]}


if __name__ == "__main__":
    main()
