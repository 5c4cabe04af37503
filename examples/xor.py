"""XOR: the perceptron fails, a two-layer network solves it.

The lesson's first story. A single perceptron draws one straight line, so on XOR it gets at
most 3 of the 4 points right (75%) however long it trains; a 2-4-1 network trained by gradient
descent (with the hand-derived backward, checked against autodiff) gets all four. Decision
boundaries go to ``OUT/xor.png``.

    python examples/xor.py [--out out] [--steps 2000]
"""
import argparse
import os

import jax
import jax.numpy as jnp

from fnn import backprop, losses
from fnn.layers import Dense, Sigmoid, Tanh, serial
from fnn.initializers import glorot_normal
from fnn.perceptron import perceptron_fit, perceptron_predict

X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y = jnp.array([0, 1, 1, 0])


def train_mlp(steps, lr, seed):
    model = serial(Dense(4, w_init=glorot_normal()), Tanh(), Dense(1, w_init=glorot_normal()),
                   Sigmoid())
    params, state, _ = model.init(jax.random.PRNGKey(seed), X.shape)
    vg = backprop.value_and_grad(model, losses.mse)
    target = Y[:, None].astype(X.dtype)

    @jax.jit
    def train(params):
        def step(params, _):
            (loss, _), grads = vg(params, state, X, target)
            return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss
        return jax.lax.scan(step, params, None, length=steps)

    params, curve = train(params)
    return model, params, state, curve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)

    pparams, mistakes = perceptron_fit(X, Y, epochs=100)
    p_acc = float(jnp.mean(perceptron_predict(pparams, X) == Y))
    print(f"perceptron: accuracy {p_acc:.0%} after 100 epochs "
          f"({int(mistakes[-1])} mistakes in the last epoch: it never converges on XOR)")

    model, params, state, curve = train_mlp(args.steps, args.lr, args.seed)
    prob = model.apply(params, state, X)[0][:, 0]
    m_acc = float(jnp.mean((prob > 0.5).astype(jnp.int32) == Y))
    print(f"2-4-1 MLP:  accuracy {m_acc:.0%}, MSE {float(curve[-1]):.4f} after {args.steps} "
          f"gradient-descent steps (outputs {[round(float(p), 3) for p in prob]})")

    try:
        import matplotlib
    except ImportError:  # plots are an optional extra
        return p_acc, m_acc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = jnp.stack(jnp.meshgrid(jnp.linspace(-0.5, 1.5, 200), jnp.linspace(-0.5, 1.5, 200)), -1)
    flat = grid.reshape(-1, 2)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, title, z in [
            (axes[0], f"perceptron ({p_acc:.0%})", perceptron_predict(pparams, flat)),
            (axes[1], f"2-4-1 MLP ({m_acc:.0%})", model.apply(params, state, flat)[0][:, 0])]:
        ax.contourf(grid[..., 0], grid[..., 1], z.reshape(200, 200), levels=20, cmap="RdBu_r",
                    alpha=0.7)
        ax.scatter(X[:, 0], X[:, 1], c=Y, cmap="RdBu_r", edgecolors="k", s=120)
        ax.set_title(title)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "xor.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"decision boundaries -> {path}")
    return p_acc, m_acc


if __name__ == "__main__":
    main()
