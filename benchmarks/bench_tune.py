"""The tuner's choices against fixed formulations (issue #25): the CNN training step and
``stack(TransformerBlock, 12)``.

(a) CNN of ``bench_conv.py`` (batch 64, 28x28x1, conv 32, conv 64, 3x3 SAME ReLU, 2x2 max pool,
    dense 128, dense 10), hand backward (``backprop.value_and_grad``), one SGD step:
    fnn untuned (``jax.jit``, tuner off: im2col kernel gradient, jaxlib's default options),
    fnn tuned (``fnn.tuning.jit``: kernel gradient and compiler options by measurement),
    PyTorch eager (when ``torch`` imports).
(b) The causal LM of ``bench_attention.py`` with ``stack(TransformerBlock, 12)``, hand backward:
    ``stack`` with the tuner's choice (``remat="auto"``), ``stack`` with stored residuals
    (``remat=False``), and the 12 blocks unrolled (``serial``).

Timings are interleaved rounds, medians; the tuner measures into a fresh cache directory first
(its choices are printed). Run under ``flock /tmp/fnn_bench.lock``::

    python benchmarks/bench_tune.py [--parts ab] [--rounds N] [--budget S]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

import bench_attention as BA
import bench_conv as BC
from fnn import backprop, tuning
from fnn.combinators import serial, stack
from fnn.layers import TransformerBlock


def part_a(rounds):
    model = BC.fnn_model()
    p, s, _ = model.init(jax.random.PRNGKey(0), (64, 28, 28, 1))
    x = jax.random.normal(jax.random.PRNGKey(2), (64, 28, 28, 1))
    y = jax.random.randint(jax.random.PRNGKey(3), (64,), 0, 10)
    vg = backprop.value_and_grad(model, BC.loss_fn)

    def step(p, x, y):
        (l, _), g = vg(p, s, x, y)
        return BC.sgd(p, g), l
    with tuning.settings(enabled=False):
        untuned = jax.jit(step)
        l0 = untuned(p, x, y)[1]                          # traced and compiled with the tuner off
    t0 = time.perf_counter()
    tuned = tuning.jit(step)
    l1 = tuned(p, x, y)[1]
    print(f"tuning + compiling the tuned step: {time.perf_counter() - t0:.1f} s; options chosen: "
          f"{tuned.options_for(p, x, y)!r}; loss untuned {float(l0):.6f} tuned {float(l1):.6f}")
    cases = {"fnn hand, untuned (jax.jit)": lambda: untuned(p, x, y)[1],
             "fnn hand, tuned (fnn.tuning.jit)": lambda: tuned(p, x, y)[1]}
    t = BC.torch_step(64)
    if t is not None:
        cases["PyTorch eager"] = t
    med = BA.interleaved(cases, rounds)
    base = med.get("PyTorch eager")
    print("\n(a) CNN training step, batch 64, hand backward")
    for n, v in med.items():
        print(f"  {n:34s} {v * 1e3:8.1f} ms" + (f"   {v / base:.2f}x PyTorch" if base else ""))
    print(f"  tuned / untuned: {med['fnn hand, tuned (fnn.tuning.jit)'] / med['fnn hand, untuned (jax.jit)']:.2f}x")


def part_b(rounds, depth=12):
    x, y = BA.data(jax.random.PRNGKey(1))
    blk = TransformerBlock(BA.H, BA.MLP, causal=True)
    runs = {}
    for name, blocks in (("stack, tuner's choice", stack(blk, depth)),
                         ("stack, stored residuals", stack(blk, depth, remat=False)),
                         ("unrolled (serial)", serial(*[blk] * depth))):
        model = BA.lm(blocks)
        params, state, _ = model.init(jax.random.PRNGKey(0), (BA.B, BA.T))
        vg = backprop.value_and_grad(model, BA.lm_loss)
        t0 = time.perf_counter()
        c, _ = BA.compiled(lambda p, x, y, vg=vg, s=state: BA.sgd(p, vg(p, s, x, y)[1]),
                           params, x, y)
        print(f"  {name}: tuning (if any) + compile {time.perf_counter() - t0:.1f} s")
        runs[name] = (lambda c=c, p=params: c(p, x, y))
    med = BA.interleaved(runs, rounds)
    print(f"\n(b) causal LM with {depth} TransformerBlocks, hand backward (step ms)")
    for n, v in med.items():
        print(f"  {n:28s} {v * 1e3:8.1f} ms   {v / med['unrolled (serial)']:.2f}x unrolled")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=60.0, help="tuner seconds per choice")
    ap.add_argument("--cache", default=None, help="tuner cache directory (default: a new one)")
    args = ap.parse_args()
    print(f"CPU: {BC.cpu_model()}   cores: {os.cpu_count()}   jax {jax.__version__}   "
          f"load avg: {os.getloadavg()[0]:.1f}")
    directory = args.cache or tempfile.mkdtemp(prefix="fnn_tune_")
    with tuning.settings(enabled=True, budget=args.budget, directory=directory):
        if "a" in args.parts:
            part_a(args.rounds)
        if "b" in args.parts:
            part_b(max(3, args.rounds // 2))
        print("\n" + tuning.report())
    print(f"load avg at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
