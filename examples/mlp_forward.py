"""An MLP's forward pass, layer by layer, with the shape of every matrix printed.

Two networks built with ``fnn.layers``. First the lesson's small 2-3-3-1 network on the input
``x = (0.5, 0.8)``: every pre-activation ``z⁽ˡ⁾ = a⁽ˡ⁻¹⁾ W⁽ˡ⁾ + b⁽ˡ⁾`` and activation
``a⁽ˡ⁾ = g(z⁽ˡ⁾)`` is printed, and drawn as a network diagram in ``OUT/mlp_forward.png``. Then
the lesson's 784-128-64-10 classifier on a batch: a table of the shape of every ``W``, ``b``,
``z`` and ``a`` (fnn keeps ``W⁽ˡ⁾`` as ``(n_{l-1}, n_l)`` and puts the batch first — the
transpose of the lesson's column-vector ``(n_l, n_{l-1})``) and the parameter count. Last, why
the activation matters: the same network with every activation removed equals one matrix.

    python examples/mlp_forward.py [--batch 32] [--sizes 784,128,64,10] [--seed 0] [--out out]
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn.core import count_params, summary
from fnn.layers import Dense, Relu, Sigmoid, Softmax, serial
from fnn.plot import save as save_figure


def mlp(sizes, hidden=Relu, output=Softmax):
    """``Dense → hidden`` for each hidden width, then ``Dense → output``."""
    layers = []
    for n in sizes[1:-1]:
        layers += [Dense(n), hidden()]
    return serial(*layers, Dense(sizes[-1]), output())


def forward_steps(model, params, state, x):
    """Run a ``serial`` child by child; returns ``[(child name, layer name, output)]``."""
    steps, a = [], x
    for n, layer in model.children:
        a, _ = layer.apply(params[n], state[n], a)
        steps.append((n, layer.name, a))
    return steps


def shape_table(params, steps, x):
    """One row per Dense: ``W``, ``b``, ``z``, ``a`` shapes (fnn's and the lesson's ``W``)."""
    rows, prev = [], x.shape
    for i, (n, name, out) in enumerate(steps):
        if not name.startswith("Dense"):
            continue
        w, b = params[n]["w"], params[n]["b"]
        a = steps[i + 1][2]
        rows.append({"layer": len(rows) + 1, "a_prev": prev, "W": w.shape, "b": b.shape,
                     "z": out.shape, "a": a.shape, "lesson_W": w.shape[::-1],
                     "params": w.size + b.size})
        prev = a.shape
    return rows


def _vec(a):
    return "[" + ", ".join(f"{float(v):.4f}" for v in np.asarray(a)) + "]"


def print_small(steps, x):
    print(f"a⁽0⁾ = x = {_vec(x[0])}")
    layer = 0
    for n, name, out in steps:
        v = _vec(out[0])
        if name.startswith("Dense"):
            layer += 1
            print(f"z⁽{layer}⁾ = a⁽{layer - 1}⁾ W⁽{layer}⁾ + b⁽{layer}⁾ = {v}")
        else:
            rhs = f"{name.lower()}(z⁽{layer}⁾)"
            print(f"a⁽{layer}⁾ = {rhs:<16s} = {v}")


def print_table(rows, total):
    head = f"{'l':>2} {'a⁽ˡ⁻¹⁾':>12} {'W⁽ˡ⁾ (fnn)':>12} {'b⁽ˡ⁾':>8} {'z⁽ˡ⁾, a⁽ˡ⁾':>12}" \
           f" {'lesson W⁽ˡ⁾':>12} {'params':>8}"
    print(head)
    for r in rows:
        print(f"{r['layer']:>2} {str(r['a_prev']):>12} {str(r['W']):>12} {str(r['b']):>8} "
              f"{str(r['z']):>12} {str(r['lesson_W']):>12} {r['params']:>8,}")
    print(f"total parameters: {total:,}")


def collapse_gap(sizes, seed):
    """Max |difference| between a deep *linear* network and the single matrix it equals."""
    model = serial(*[Dense(n) for n in sizes[1:]])
    params, state, _ = model.init(jax.random.PRNGKey(seed), (4, sizes[0]))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (4, sizes[0]), jnp.zeros(()).dtype)
    w, b = jnp.eye(sizes[0], dtype=x.dtype), jnp.zeros((sizes[0],), x.dtype)
    for n in params:                               # (xW₁+b₁)W₂+b₂ = x(W₁W₂) + (b₁W₂+b₂)
        w, b = w @ params[n]["w"], b @ params[n]["w"] + params[n]["b"]
    deep = model.apply(params, state, x)[0]
    return float(jnp.max(jnp.abs(deep - (x @ w + b[None, :]))))


def plot_network(params, steps, x, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [np.asarray(x[0])] + [np.asarray(o[0]) for _, name, o in steps
                                  if not name.startswith("Dense")]
    ws = [np.asarray(params[n]["w"]) for n, name, _ in steps if name.startswith("Dense")]
    ypos = [np.linspace((len(c) - 1) / 2, -(len(c) - 1) / 2, len(c)) for c in cols]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    top = max(abs(w).max() for w in ws)
    for l, w in enumerate(ws):
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.plot([l, l + 1], [ypos[l][i], ypos[l + 1][j]], lw=0.5 + 3 * abs(w[i, j]) / top,
                        color="tab:red" if w[i, j] > 0 else "tab:blue", alpha=0.6, zorder=1)
    for l, c in enumerate(cols):
        ax.scatter(np.full(len(c), l), ypos[l], s=900, c=c, cmap="Greys", vmin=0, vmax=1,
                   edgecolors="k", zorder=2)
        for yv, v in zip(ypos[l], c):
            ax.text(l, yv, f"{v:.2f}", ha="center", va="center", fontsize=8, zorder=3,
                    color="white" if v > 0.5 else "black")
    names = ["input"] + [f"hidden {l}" for l in range(1, len(cols) - 1)] + ["output"]
    ax.set_xticks(range(len(cols)), [f"{n}\n{len(c)} units" for n, c in zip(names, cols)])
    ax.set_yticks([])
    ax.set_title("forward pass of the 2-3-3-1 network (edge width |w|, red > 0, blue < 0)",
                 fontsize=9)
    for s in ax.spines.values():
        s.set_visible(False)
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="784,128,64,10", help="layer widths, input first")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="batch of 4")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batch = 4 if args.quick else args.batch
    dtype = jnp.zeros(()).dtype

    small = mlp([2, 3, 3, 1], hidden=Relu, output=Sigmoid)
    sx = jnp.array([[0.5, 0.8]], dtype)
    sparams, sstate, _ = small.init(jax.random.PRNGKey(args.seed + 1), sx.shape)
    ssteps = forward_steps(small, sparams, sstate, sx)
    print("the 2-3-3-1 network (ReLU hidden layers, sigmoid output) on one input:")
    print_small(ssteps, sx)

    model = mlp(sizes)
    x = jax.random.uniform(jax.random.PRNGKey(args.seed + 1), (batch, sizes[0]), dtype)
    params, state, out_shape = model.init(jax.random.PRNGKey(args.seed), x.shape)
    steps = forward_steps(model, params, state, x)
    rows = shape_table(params, steps, x)
    total = count_params(params)
    print(f"\nthe {'-'.join(map(str, sizes))} network on a batch of {batch} "
          f"(ReLU hidden, softmax output):")
    print_table(rows, total)
    print("\nfnn.summary of the same model:")
    print(summary(model, x.shape))
    probs = steps[-1][2]
    print(f"softmax rows sum to 1: max |Σ − 1| = {float(jnp.max(jnp.abs(probs.sum(-1) - 1))):.1e}")
    gap = collapse_gap(sizes, args.seed)
    print(f"without activations the {len(sizes) - 1} layers equal one {sizes[0]}x{sizes[-1]} "
          f"matrix: max |difference| = {gap:.1e}")

    path = os.path.join(args.out, "mlp_forward.png")
    plot_network(sparams, ssteps, sx, path)
    print(f"network diagram -> {path}")
    return {"small_params": sparams, "small_x": sx, "small_steps": ssteps, "sizes": sizes,
            "params": params, "x": x, "steps": steps, "table": rows, "total_params": total,
            "output_shape": out_shape, "collapse_gap": gap, "figure": path}


if __name__ == "__main__":
    main()
