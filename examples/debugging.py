"""The debugging checklist in code: ``fnn.debug.checklist`` on a healthy model and on four broken ones, each fault named.

The lesson's "Debugging Neural Networks": overfit a small batch, check the data pipeline, monitor
gradient norms, start simple, check gradients numerically. ``fnn.debug.checklist(model, loss, (x, y))``
runs those five checks (``fnn doctor TASK`` runs them on a bundled task) and reports findings
in plain words. Here a 3-class problem (Gaussian clusters in 8 dimensions, 32 examples) and a
small ReLU MLP, first healthy, then with one planted fault each:

1. **dead ReLUs** — the first layer's bias initialized to −8: every pre-activation is negative,
   the ReLUs output 0 for every example, and no gradient reaches the first layer;
2. **unnormalized inputs** — the same data in raw units, ``40 + 25·x``;
3. **a label out of range** — labels 1..3 (1-based) for a 3-output model;
4. **a wrong hand backward** — a layer ``y = x ⊙ s + t`` whose backward forgets the ``x`` in
   ``ds = Σ dy ⊙ x``.

Each report is printed. ``--quick`` runs, for the broken models, only the checks that find their
fault (the data check always), and all but the overfit test for the healthy one (its compilation
is the slowest; ``tests/test_debug.py`` tests it), to keep the smoke test short. Figure ``OUT/debugging.png``: the
first layer's pre-activations under both initializations, and the buggy model's hand-derived
gradient against ``jax.grad``, component by component.

    python examples/debugging.py [--out out] [--quick] [--seed 0]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)        # the gradient check needs float64

from fnn import backprop, debug, initializers, losses   # noqa: E402
from fnn.core import Layer, from_backward               # noqa: E402
from fnn.layers import Dense, Relu, serial              # noqa: E402
from fnn.plot import save as save_figure  # noqa: E402

LOSS = losses.softmax_cross_entropy_with_integer_labels
CLASSES, FEATURES, N = 3, 8, 32


def BuggyScale() -> Layer:
    """``y = x ⊙ s + t`` per feature, with a planted bug: ``ds = Σ dy`` (should be ``Σ dy ⊙ x``)."""
    def init(key, input_shape):
        f = input_shape[-1:]
        return {"s": jnp.ones(f), "t": jnp.zeros(f)}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        return x * params["s"][None, :] + params["t"][None, :], state

    def backward(params, state, x, dy, *, key=None, train=False):
        return ({"s": jnp.sum(dy, axis=0),                    # bug: Σ dy ⊙ x
                 "t": jnp.sum(dy, axis=0)}, dy * params["s"][None, :])
    return from_backward(init, apply, backward, name="BuggyScale")


def data(seed):
    """``x: [N, FEATURES]`` standardized Gaussian clusters (class ``c`` shifted by 2 along axis
    ``c``), ``y: [N]`` labels in ``[0, CLASSES)`` (NumPy: no compilation)."""
    y = np.arange(N) % CLASSES
    x = np.random.default_rng(seed).normal(size=(N, FEATURES)) + 2.0 * np.eye(FEATURES)[y]
    return (x - x.mean(0)) / x.std(0), y


def mlp(first_bias=0.0):
    return serial(Dense(16, b_init=initializers.constant(first_bias)), Relu(), Dense(CLASSES))


def cases(seed):
    """``{name: (model, x, y, the checks that find the fault)}``: healthy, then one fault each."""
    x, y = data(seed)
    return {"healthy": (mlp(), x, y, ("data", "size", "gradients", "backward")),
            "dead ReLUs (first bias -8)": (mlp(-8.0), x, y, ("data", "gradients")),
            "unnormalized inputs (40 + 25·x)": (mlp(), 40 + 25 * x, y, ("data",)),
            "labels 1..3 for 3 outputs": (mlp(), x, y + 1, ("data",)),
            "wrong backward (BuggyScale)": (serial(Dense(16), BuggyScale(), Relu(),
                                                   Dense(CLASSES)), x, y, ("data", "backward"))}


def plot(pre, grads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, c) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    bins = np.linspace(min(v.min() for v in pre.values()), max(v.max() for v in pre.values()), 40)
    for name, v in pre.items():
        a.hist(v.ravel(), bins=bins, alpha=0.6, label=name)
    a.axvline(0, color="k", lw=0.8)
    a.set(title="first layer's pre-activations at init", xlabel="x·w + b (the ReLU passes > 0)",
          ylabel="count (32 examples × 16 units)")
    a.legend(fontsize=8)
    for (name, (hand, auto)), marker in zip(grads.items(), "o+x"):
        c.scatter(auto, hand, s=16, marker=marker, label=name)
    lim = max(np.abs(np.concatenate([np.ravel(u) for v in grads.values() for u in v]))) * 1.1
    c.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
    c.set(title="wrong backward: each gradient component", xlabel="jax.grad",
          ylabel="hand-derived (fnn.backprop)")
    c.legend(fontsize=8)
    save_figure(fig, path)


def figure_data(all_cases, key):
    """The numbers behind the figure: pre-activations and the buggy model's gradients
    (hand-derived and ``jax.grad``) of its BuggyScale and first Dense leaves."""
    pre = {}
    for label, name in (("healthy (zero bias)", "healthy"), ("bias −8", "dead ReLUs (first bias -8)")):
        model, x, _, _ = all_cases[name]
        p = model.init(key, x.shape)[0]["0"]
        pre[label] = np.asarray(x @ p["w"] + p["b"][None, :])
    model, x, y, _ = all_cases["wrong backward (BuggyScale)"]
    params, state, _ = model.init(key, x.shape)
    hand = backprop.grad(model, LOSS)
    f = lambda p: LOSS(model.apply(p, state, x)[0], y)
    gh, ga = jax.jit(lambda p: (hand(p, state, x, y), jax.grad(f)(p)))(params)
    grads = {f"layer 1 {k}": (np.asarray(gh["1"][k]), np.asarray(ga["1"][k])) for k in "st"}
    grads["layer 0 w"] = (np.asarray(gh["0"]["w"]).ravel(), np.asarray(ga["0"]["w"]).ravel())
    return pre, grads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true",
                    help="only the checks that find each fault (no overfit test for the healthy model)")
    args = ap.parse_args(argv)
    key = jax.random.PRNGKey(args.seed)
    all_cases = cases(args.seed)
    reports = {}
    for name, (model, x, y, checks) in all_cases.items():
        reports[name] = debug.checklist(model, LOSS, (x, y), key=key,
                                        checks=checks if args.quick else debug.CHECKS)
        reports[name].title = name
        print(reports[name], end="\n\n")
    path = os.path.join(args.out, "debugging.png")
    pre, grads = figure_data(all_cases, key)
    plot(pre, grads, path)
    print(f"wrote {path}")
    return {"reports": reports, "cases": all_cases, "pre": pre, "grads": grads, "figure": path}


if __name__ == "__main__":
    main()
