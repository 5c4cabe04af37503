"""The tuner's choices against fixed formulations (issue #25): the CNN training step and
``stack(TransformerBlock, 12)``.

(a) CNN of ``bench_conv.py`` (batch 64, 28x28x1, conv 32, conv 64, 3x3 SAME ReLU, 2x2 max pool,
    dense 128, dense 10), hand backward (``backprop.value_and_grad``), one SGD step:
    fnn untuned (``jax.jit``, tuner off: im2col kernel gradient, jaxlib's default options),
    fnn tuned (``fnn.tuning.jit``: kernel gradient and compiler options by measurement),
    PyTorch eager (when ``torch`` imports); the fnn steps also as ``fit`` runs them, 8 steps in
    a ``fori_loop`` (time per step).
(b) The causal LM of ``bench_attention.py`` with ``stack(TransformerBlock, 12)``, hand backward:
    ``stack`` with the tuner's choice (``remat="auto"``), ``stack`` with stored residuals
    (``remat=False``), and the 12 blocks unrolled (``serial``).
(c) The causal LM of ``bench_attention.py`` (``GPT``, depth 4, blocks in a ``stack``) at a longer
    sequence (``--length``, default 1024; batch ``--batch``, default 2), hand backward, one SGD
    step: attention's block size chosen by the tuner (``chunk_size="auto"``), the whole score
    matrix (``None``, the default) and a fixed block (``--chunk``, default 256).

Timings are interleaved rounds, medians; the tuner measures into a fresh cache directory first
(its choices are printed). Run under ``flock /tmp/fnn_bench.lock``::

    python benchmarks/bench_tune.py [--parts abc] [--rounds N] [--budget S]
        [--length T] [--batch B] [--chunk C]
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


LOOP = 8        # (a): steps per loop in the "as fit runs it" cases


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
    # LOOP steps in a fori_loop over LOOP different batches, as fit's epochs run them (a batch
    # that stays the same would let XLA hoist its transposes out of the loop)
    xs = jax.random.normal(jax.random.PRNGKey(4), (LOOP, 64, 28, 28, 1))
    ys = jax.random.randint(jax.random.PRNGKey(5), (LOOP, 64), 0, 10)

    def steps(p, xs, ys):
        return jax.lax.fori_loop(0, LOOP, lambda i, p: step(p, xs[i], ys[i])[0], p)
    with tuning.settings(enabled=False):
        untuned_loop = jax.jit(steps)
        untuned_loop(p, xs, ys)
    tuned_loop = tuning.jit(steps)
    jax.block_until_ready(tuned_loop(p, xs, ys))
    print(f"options chosen for the {LOOP}-step loop: {tuned_loop.options_for(p, xs, ys)!r}")
    cases = {"fnn hand, untuned (jax.jit)": lambda: untuned(p, x, y)[1],
             "fnn hand, tuned (fnn.tuning.jit)": lambda: tuned(p, x, y)[1],
             f"untuned, {LOOP}-step loop": lambda: untuned_loop(p, xs, ys),
             f"tuned, {LOOP}-step loop": lambda: tuned_loop(p, xs, ys)}
    t = BC.torch_step(64)
    if t is not None:
        cases["PyTorch eager"] = t
    med = BA.interleaved(cases, rounds)
    med = {n: v / LOOP if "loop" in n else v for n, v in med.items()}     # per step
    base = med.get("PyTorch eager")
    print("\n(a) CNN training step, batch 64, hand backward")
    for n, v in med.items():
        print(f"  {n:34s} {v * 1e3:8.1f} ms" + (f"   {v / base:.2f}x PyTorch" if base else ""))
    print(f"  tuned / untuned: {med['fnn hand, tuned (fnn.tuning.jit)'] / med['fnn hand, untuned (jax.jit)']:.2f}x"
          f" alone, {med[f'tuned, {LOOP}-step loop'] / med[f'untuned, {LOOP}-step loop']:.2f}x in a loop")


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


def part_c(rounds, length=1024, batch=2, chunk=256):
    from fnn.models import GPT, value_and_grad
    from fnn.layers import _attention_tuning
    toks = jax.random.randint(jax.random.PRNGKey(1), (batch, length + 1), 0, BA.V)
    x, y = toks[:, :-1], toks[:, 1:]
    print(f"\n(c) causal LM, vocab {BA.V}, d {BA.D}, {BA.H} heads, MLP {BA.MLP}, depth "
          f"{BA.DEPTH}, seq {length}, batch {batch}, hand backward; blocks tried by "
          f"chunk_size='auto': None and {[c for c in _attention_tuning.BLOCKS if c < length]}")
    runs, losses = {}, {}
    for name, c in (("chunk_size='auto' (tuner)", "auto"), ("chunk_size=None (default)", None),
                    (f"chunk_size={chunk} (fixed)", chunk)):
        model = GPT(BA.V, BA.D, BA.H, BA.DEPTH, BA.MLP, length, chunk_size=c)
        params, state, _ = model.init(jax.random.PRNGKey(0), (batch, length))
        vg = value_and_grad(model)

        def step(p, x, y, vg=vg, s=state):
            (loss, _), g = vg(p, s, x, y, train=False)
            return BA.sgd(p, g), loss
        t0 = time.perf_counter()
        comp, _ = BA.compiled(step, params, x, y)
        losses[name] = float(comp(params, x, y)[1])
        print(f"  {name}: tuning (if any) + compile {time.perf_counter() - t0:.1f} s; "
              f"loss {losses[name]:.6f}")
        runs[name] = (lambda c=comp, p=params: c(p, x, y))
    med = BA.interleaved(runs, rounds)
    base = med["chunk_size=None (default)"]
    print(f"\n(c) step ms (interleaved medians of {rounds})")
    for n, v in med.items():
        print(f"  {n:30s} {v * 1e3:8.1f} ms   {v / base:.2f}x None")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=60.0, help="tuner seconds per choice")
    ap.add_argument("--cache", default=None, help="tuner cache directory (default: a new one)")
    ap.add_argument("--length", type=int, default=1024, help="(c) sequence length")
    ap.add_argument("--batch", type=int, default=2, help="(c) batch")
    ap.add_argument("--chunk", type=int, default=256, help="(c) the fixed block size")
    args = ap.parse_args()
    print(f"CPU: {BC.cpu_model()}   cores: {os.cpu_count()}   jax {jax.__version__}   "
          f"load avg: {os.getloadavg()[0]:.1f}")
    directory = args.cache or tempfile.mkdtemp(prefix="fnn_tune_")
    with tuning.settings(enabled=True, budget=args.budget, directory=directory):
        if "a" in args.parts:
            part_a(args.rounds)
        if "b" in args.parts:
            part_b(max(3, args.rounds // 2))
        if "c" in args.parts:
            part_c(args.rounds, args.length, args.batch, args.chunk)
        print("\n" + tuning.report())
    print(f"load avg at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
