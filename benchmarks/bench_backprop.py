"""Time per jitted training step: manual backprop against autodiff, block by block.

Three ways to get the gradients of one SGD step ``p ← p − lr·∇L(p)``, each jitted:

- ``autodiff``:   ``jax.value_and_grad`` of ``loss(model.apply(...))`` — the reference;
- ``manual``:     ``fnn.backprop.value_and_grad`` — the hand-derived rules composed;
- ``custom_vjp``: ``jax.value_and_grad`` through ``fnn.backprop.custom_vjp(model)``.

Repetitions are interleaved (every sample times each variant in turn, the order rotating), and
the medians and ratios to autodiff are printed; the goal is ``manual ≤ 1.10 × autodiff``. With
``--hlo`` it also prints, per variant, XLA's flop estimate and op counts of the optimized HLO:
the way to see whether the forward pass that ``serial``'s backward recomputes is deduplicated
(CSE) or really run twice.

    python benchmarks/bench_backprop.py [--quick] [--models mlp,cnn,lstm,transformer] [--hlo]
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import time

import jax
import jax.numpy as jnp

import fnn.layers as L
from fnn import backprop, losses
from fnn.combinators import serial, stack
from fnn.core import count_params

VARIANTS = ("autodiff", "manual", "custom_vjp")


# --------------------------------------------------------------------------- models

def mlp(quick):
    b, h = (64, 256) if quick else (128, 512)
    return (serial(L.Dense(h), L.Relu(), L.Dense(h), L.Relu(), L.Dense(10)), (b, 784),
            "classes")


def cnn(quick):
    b, s = (32, 16) if quick else (64, 28)
    return (serial(L.Conv(16, (3, 3)), L.Relu(), L.MaxPool((2, 2)), L.Conv(32, (3, 3)),
                   L.Relu(), L.MaxPool((2, 2)), L.Flatten(), L.Dense(10)), (b, s, s, 1),
            "classes")


def lstm(quick):
    b, t = (16, 16) if quick else (32, 32)
    return serial(L.LSTM(64, return_sequences=False), L.Dense(10)), (b, t, 32), "classes"


def transformer(quick):
    b, t = (8, 32) if quick else (16, 64)
    return serial(L.TransformerBlock(4, 256), L.TransformerBlock(4, 256)), (b, t, 64), "same"


def stacked(remat):
    def build(quick):
        b, t = (8, 32) if quick else (16, 64)
        return stack(L.TransformerBlock(4, 256), 2, remat=remat), (b, t, 64), "same"
    return build


MODELS = {"mlp": (mlp, ()), "cnn": (cnn, ("Conv", "MaxPool")), "lstm": (lstm, ("LSTM",)),
          "transformer": (transformer, ("TransformerBlock",)),
          "stack": (stacked(False), ("TransformerBlock",)),
          "stack-remat": (stacked(True), ("TransformerBlock",))}


# --------------------------------------------------------------------------- steps

def make_steps(model, loss, state, lr=1e-2):
    """The three jitted training steps ``(params, x, y) -> (params, loss)``."""
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - lr * b, p, g)

    def through(m):
        def step(p, x, y):
            v, g = jax.value_and_grad(lambda p: loss(m.apply(p, state, x, train=True)[0], y))(p)
            return sgd(p, g), v
        return step

    vg = backprop.value_and_grad(model, loss)

    def manual(p, x, y):
        (v, _), g = vg(p, state, x, y, train=True)
        return sgd(p, g), v

    return {"autodiff": jax.jit(through(model)), "manual": jax.jit(manual),
            "custom_vjp": jax.jit(through(backprop.custom_vjp(model)))}


def hlo_stats(step, *args):
    """XLA's flop estimate and op counts of the optimized HLO of ``step(*args)``."""
    compiled = step.lower(*args).compile()
    ops = collections.Counter(m.group(1) for m in re.finditer(
        r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*.*?\b([a-z][a-z0-9-]*)\(", compiled.as_text(), re.M))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float((cost or {}).get("flops", float("nan"))),
            "dot": ops["dot"], "conv": ops["convolution"], "fusion": ops["fusion"],
            "while": ops["while"], "reduce-window": ops["reduce-window"],
            "select-and-scatter": ops["select-and-scatter"], "total": sum(ops.values())}


def time_steps(steps, params, x, y, reps, inner):
    """Median seconds per step of each variant, samples interleaved (order rotating)."""
    names = list(steps)
    state = {n: params for n in names}
    for n in names:                                      # compile and warm up
        state[n], v = steps[n](state[n], x, y)
        jax.block_until_ready(v)
    samples = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            p = state[n]
            t0 = time.perf_counter()
            for _ in range(inner):
                p, v = steps[n](p, x, y)
            jax.block_until_ready((p, v))
            samples[n].append((time.perf_counter() - t0) / inner)
            state[n] = p
    return {n: statistics.median(s) for n, s in samples.items()}


# --------------------------------------------------------------------------- main

def data(shape, kind, out_shape, key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, shape, jnp.float32)
    if kind == "classes":
        return x, jax.random.randint(ky, (shape[0],), 0, 10), \
            losses.softmax_cross_entropy_with_integer_labels
    return x, jax.random.normal(ky, out_shape, jnp.float32), losses.mse


def bench(name, quick, reps, inner, hlo):
    build, needs = MODELS[name]
    missing = [n for n in needs if not hasattr(L, n)]
    if missing:
        print(f"{name:12s} skipped: fnn.layers lacks {', '.join(missing)}")
        return None
    model, shape, kind = build(quick)
    key = jax.random.PRNGKey(0)
    params, state, out_shape = model.init(key, shape)
    x, y, loss = data(shape, kind, out_shape, jax.random.fold_in(key, 1))
    steps = make_steps(model, loss, state)
    losses_ = {n: float(s(params, x, y)[1]) for n, s in steps.items()}
    spread = max(abs(v - losses_["autodiff"]) for v in losses_.values())
    times = time_steps(steps, params, x, y, reps, inner)
    base = times["autodiff"]
    print(f"{name:12s} input {str(shape):18s} params {count_params(params):>9,}  " + "  ".join(
        f"{n} {1e3 * t:8.3f} ms ({t / base:4.2f}x)" for n, t in times.items())
        + f"  |Δloss| {spread:.1e}")
    if hlo:
        for n, s in steps.items():
            st = hlo_stats(s, params, x, y)
            print(f"{'':12s}   {n:10s} " + "  ".join(f"{k} {v:.3g}" if k == "flops" else
                                                       f"{k} {v}" for k, v in st.items()))
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=None, help="interleaved samples per variant")
    ap.add_argument("--inner", type=int, default=None, help="steps per sample")
    ap.add_argument("--hlo", action="store_true", help="print flops and HLO op counts")
    args = ap.parse_args(argv)
    reps = args.reps or (5 if args.quick else 21)
    inner = args.inner or (3 if args.quick else 10)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, float32, "
          f"{reps} interleaved samples of {inner} steps, medians")
    results = {}
    for name in args.models.split(","):
        results[name] = bench(name.strip(), args.quick, reps, inner, args.hlo)
    return results


if __name__ == "__main__":
    main()
