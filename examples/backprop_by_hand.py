"""Backpropagation by hand: the lesson's 2-layer sigmoid network, one chain-rule factor at a time.

The network has one neuron per layer, so every quantity is a number you can check on paper::

    z₁ = w₁·x + b₁    a₁ = σ(z₁)    z₂ = w₂·a₁ + b₂    ŷ = σ(z₂)    L = (ŷ − y)²

    ∂L/∂w₁ = ∂L/∂ŷ · ∂ŷ/∂z₂ · ∂z₂/∂a₁ · ∂a₁/∂z₁ · ∂z₁/∂w₁
           = 2(ŷ − y) · ŷ(1 − ŷ) · w₂ · a₁(1 − a₁) · x

The script prints each factor (from fnn's hand-derived ``losses.mse.grad`` and
``activations.sigmoid.grad``), their product, and then every gradient four ways side by side:
the chain rule written out, ``fnn.backprop`` (the layers' ``backward`` rules), ``jax.grad`` and
central finite differences (``fnn.gradcheck``). Finally it trains the network by gradient
descent and plots how the factors evolve: as ŷ saturates, ŷ(1 − ŷ) shrinks and so does every
gradient behind it — the vanishing gradient, seen in one neuron.

    python examples/backprop_by_hand.py [--epochs 300] [--lr 2.0] [--out out] [--quick]

The weights are fixed (the lesson's numbers), so ``--seed`` changes nothing; it is accepted
for the examples' common command line.
"""
import argparse
import os

import jax

jax.config.update("jax_enable_x64", True)      # finite differences need float64

import jax.numpy as jnp  # noqa: E402

from fnn import backprop, gradcheck, losses  # noqa: E402
from fnn.activations import sigmoid  # noqa: E402
from fnn.layers import Dense, Sigmoid, serial  # noqa: E402
from fnn.plot import save as save_figure  # noqa: E402

MODEL = serial(Dense(1), Sigmoid(), Dense(1), Sigmoid())      # params "0" and "2"


def make_params(w1, b1, w2, b2):
    """The 1-1-1 network's parameters in fnn's layout (``w: (in, out)``, ``b: (out,)``)."""
    return {"0": {"w": jnp.array([[w1]]), "b": jnp.array([b1])}, "1": {},
            "2": {"w": jnp.array([[w2]]), "b": jnp.array([b2])}, "3": {}}


def forward(params, x):
    """The forward pass, keeping every intermediate (floats)."""
    w1, b1 = params["0"]["w"][0, 0], params["0"]["b"][0]
    w2, b2 = params["2"]["w"][0, 0], params["2"]["b"][0]
    z1 = w1 * x + b1
    a1 = sigmoid(z1)
    z2 = w2 * a1 + b2
    return {"w1": w1, "w2": w2, "z1": z1, "a1": a1, "z2": z2, "y_hat": sigmoid(z2)}


FACTORS = ("∂L/∂ŷ   = 2(ŷ − y)", "∂ŷ/∂z₂  = ŷ(1 − ŷ)", "∂z₂/∂a₁ = w₂", "∂a₁/∂z₁ = a₁(1 − a₁)",
           "∂z₁/∂w₁ = x")


def chain_factors(params, x, y):
    """The five factors of ∂L/∂w₁ (in ``FACTORS`` order), from fnn's hand-derived derivatives."""
    f = forward(params, x)
    y_hat = jnp.reshape(f["y_hat"], (1, 1))
    return (losses.mse.grad(y_hat, jnp.full((1, 1), y))[0, 0],   # mean over one entry
            sigmoid.grad(f["z2"]), f["w2"], sigmoid.grad(f["z1"]), jnp.asarray(x, float))


def by_chain_rule(params, x, y):
    """All four gradients from the factors: δ₂ = ∂L/∂z₂, δ₁ = ∂L/∂z₁ (the lesson's deltas)."""
    dl, dyz, w2, daz, _ = chain_factors(params, x, y)
    f = forward(params, x)
    delta2 = dl * dyz                 # error at the output pre-activation
    delta1 = delta2 * w2 * daz        # propagated back through w₂ and σ'
    return {"w1": delta1 * x, "b1": delta1, "w2": delta2 * f["a1"], "b2": delta2}


def flat(g):
    """fnn's param tree of gradients → ``{"w1", "b1", "w2", "b2"}``."""
    return {"w1": g["0"]["w"][0, 0], "b1": g["0"]["b"][0], "w2": g["2"]["w"][0, 0],
            "b2": g["2"]["b"][0]}


def four_ways(params, x, y):
    """Every gradient by chain rule, fnn.backprop, jax.grad and finite differences."""
    X, Y = jnp.full((1, 1), x), jnp.full((1, 1), y)
    state = {n: {} for n in params}
    loss = lambda p: losses.mse(MODEL.apply(p, state, X)[0], Y)
    return {"chain rule": by_chain_rule(params, x, y),
            "fnn.backprop": flat(backprop.grad(MODEL, losses.mse)(params, state, X, Y)),
            "jax.grad": flat(jax.grad(loss)(params)),
            "finite diff": flat(gradcheck.numerical_grad(loss, params))}


def explain(params, x, y):
    f = forward(params, x)
    print(f"forward:  x = {x}   z₁ = {f['z1']:.6f}   a₁ = σ(z₁) = {f['a1']:.6f}   "
          f"z₂ = {f['z2']:.6f}   ŷ = σ(z₂) = {f['y_hat']:.6f}   "
          f"L = (ŷ − y)² = {(f['y_hat'] - y) ** 2:.6f}   (y = {y})\n")
    product = 1.0
    for name, value in zip(FACTORS, chain_factors(params, x, y)):
        product = product * value
        print(f"  {name:22s} = {value: .10f}")
    print(f"  {'product = ∂L/∂w₁':22s} = {product: .10f}\n")

    ways = four_ways(params, x, y)
    print(f"{'':6s}" + "".join(f"{k:>18s}" for k in ways) + f"{'max rel. diff':>16s}")
    for p in ("w1", "b1", "w2", "b2"):
        vals = [float(w[p]) for w in ways.values()]
        spread = (max(vals) - min(vals)) / max(abs(v) for v in vals)
        print(f"{'∂L/∂' + p:6s}" + "".join(f"{v:18.10f}" for v in vals) + f"{spread:16.1e}")
    return product


def train(params, x, y, epochs, lr):
    """Gradient descent with the hand-derived gradient; records loss and factors per step."""
    X, Y = jnp.full((1, 1), x), jnp.full((1, 1), y)
    state = {n: {} for n in params}
    step = jax.jit(backprop.value_and_grad(MODEL, losses.mse))
    factors = jax.jit(chain_factors)
    history = []
    for _ in range(epochs):
        values = [float(v) for v in factors(params, x, y)]
        (value, _), grads = step(params, state, X, Y)
        history.append({"loss": float(value), "∂L/∂w₁": float(grads["0"]["w"][0, 0]),
                        **dict(zip(FACTORS, values))})
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return params, history


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.semilogy([h["loss"] for h in history], label="loss L = (ŷ − y)²")
    a.semilogy([abs(h["∂L/∂w₁"]) for h in history], label="|∂L/∂w₁| (the product)")
    a.set(title="loss and gradient", xlabel="gradient-descent step")
    a.legend(fontsize=8)
    for k in FACTORS:
        b.plot([h[k] for h in history], label=k)
    b.axhline(0, color="k", lw=0.5)
    b.set(title="the five chain-rule factors of ∂L/∂w₁", xlabel="gradient-descent step")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--x", type=float, default=0.5)
    ap.add_argument("--y", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=300, help="gradient-descent steps")
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="30 steps")
    ap.add_argument("--seed", type=int, default=0, help="unused: the weights are fixed")
    args = ap.parse_args(argv)
    epochs = 30 if args.quick else args.epochs

    params = make_params(w1=0.6, b1=-0.2, w2=1.5, b2=0.3)
    product = explain(params, args.x, args.y)

    state = {n: {} for n in params}
    X, Y = jnp.full((1, 1), args.x), jnp.full((1, 1), args.y)
    report = gradcheck.check_model(MODEL, losses.mse, params, state, X, Y)
    print(f"\nfnn.gradcheck of the layers' backward rules and of jax.grad:\n{report}\n")

    trained, history = train(params, args.x, args.y, epochs, args.lr)
    print(f"after {epochs} steps: L {history[0]['loss']:.4f} → {history[-1]['loss']:.6f}, "
          f"ŷ = {float(forward(trained, args.x)['y_hat']):.4f}; "
          f"ŷ(1 − ŷ) fell from {history[0][FACTORS[1]]:.4f} to {history[-1][FACTORS[1]]:.4f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "backprop_by_hand.png")
    plot(history, path)
    print(f"wrote {path}")
    factors = [float(v) for v in chain_factors(params, args.x, args.y)]
    return {"dw1": float(product), "factors": factors,
            "four_ways": jax.tree.map(float, four_ways(params, args.x, args.y)),
            "history": history, "report": report, "figure": path}


if __name__ == "__main__":
    main()
