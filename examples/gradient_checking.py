"""Gradient checking: hand-derived gradients against central finite differences, a wrong one caught.

The lesson's "use gradient checking" advice with ``fnn.gradcheck``. (1) A small tanh MLP on
random data: ``gradcheck.check_model`` compares fnn's hand-derived backward (and ``jax.grad``) with
central differences ``(f(θ+h) − f(θ−h)) / 2h`` on every parameter, and prints the worst relative
error per leaf (about 1e-9 or less in float64). (2) The same check on a layer whose backward has a
planted bug — ``y = x²·s`` whose ``ds`` forgets the square — fails and names the leaf. (3) Why
float64: the relative error of a central difference against the exact derivative as a function of
the step ``h``, in float32 and float64. Truncation error falls as ``h²``, rounding error grows as
``ε/h``; the best ``h`` is near ``ε^(1/3)`` (5e-3 in float32, 6e-6 in float64), where float32 is
at best good to ~1e-5 and much worse away from that h — too coarse to tell a right gradient from a slightly wrong one.
Figure: ``OUT/gradient_checking.png``.

    python examples/gradient_checking.py [--out out] [--quick] [--seed 0]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)        # finite differences need float64

from fnn import gradcheck, losses                  # noqa: E402
from fnn.core import Layer, from_backward          # noqa: E402
from fnn.layers import Dense, Tanh, serial         # noqa: E402
from fnn.plot import save as save_figure  # noqa: E402


def BuggySquareScale() -> Layer:
    """``y = x² ⊙ s`` with a planted bug: ``ds = Σ dy·x`` (should be ``Σ dy·x²``)."""
    def init(key, input_shape):
        return {"s": jnp.ones(input_shape[-1:])}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        return x * x * params["s"][None, :], state

    def backward(params, state, x, dy, *, key=None, train=False):
        return {"s": jnp.sum(dy * x, axis=0)}, 2 * x * dy * params["s"][None, :]   # bug: x, not x²
    return from_backward(init, apply, backward, name="BuggySquareScale")


def check(model, key, n, d):
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d))
    y = jax.random.normal(ky, (n, 3))
    params, state, _ = model.init(kp, x.shape)
    return gradcheck.check_model(model, losses.mse, params, state, x, y, raise_on_fail=False)


def step_sizes(key, hs):
    """Relative error of the central difference of ``f(t) = Σ tanh(W(x + t v))`` at t = 0,
    against ``jax.grad`` in float64, for each step ``h``, in float32 and float64."""
    kw, kx, kv = jax.random.split(key, 3)
    w, x, v = (jax.random.normal(k, s) for k, s in ((kw, (8, 8)), (kx, (8,)), (kv, (8,))))
    f = lambda t, dt: jnp.sum(jnp.tanh(w.astype(dt) @ (x.astype(dt) + t * v.astype(dt))))
    exact = float(jax.grad(lambda t: f(t, jnp.float64))(0.0))
    errs = {}
    for dt in (jnp.float32, jnp.float64):
        fd = [(float(f(dt(h), dt)) - float(f(dt(-h), dt))) / (2 * float(dt(h))) for h in hs]
        errs[jnp.dtype(dt).name] = np.abs(np.array(fd) - exact) / abs(exact)
    return errs


def plot(hs, errs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, e in errs.items():
        ax.loglog(hs, np.maximum(e, 1e-17), "o-", ms=3, label=name)
        eps = float(jnp.finfo(name).eps)
        ax.axvline(eps ** (1 / 3), ls=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("step h")
    ax.set_ylabel("relative error of the central difference")
    ax.set_title("truncation ~h², rounding ~ε/h (dotted: ε^(1/3))")
    ax.legend()
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="smaller network (smoke test)")
    args = ap.parse_args(argv)
    key = jax.random.PRNGKey(args.seed)
    width, n = (4, 5) if args.quick else (16, 32)
    good = check(serial(Dense(width), Tanh(), Dense(3)), key, n, 6)
    print(good)
    bad = check(serial(Dense(width), BuggySquareScale(), Dense(3)), key, n, 6)
    print(bad)
    caught = sorted({r.leaf for r in bad.failures()})
    print(f"the planted bug is caught in: {', '.join(caught)}")
    hs = np.logspace(-12, -1, 12 if args.quick else 34)
    errs = step_sizes(key, hs)
    best = {k: (float(hs[np.argmin(e)]), float(e.min())) for k, e in errs.items()}
    for k, (h, e) in best.items():
        print(f"{k}: best step h = {h:.1e}, relative error {e:.1e}")
    path = os.path.join(args.out, "gradient_checking.png")
    plot(hs, errs, path)
    print(f"wrote {path}")
    return {"good": good, "bad": bad, "caught": caught, "hs": hs, "errors": errs, "best": best,
            "figure": path}


if __name__ == "__main__":
    main()
