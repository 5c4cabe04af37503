"""Mixed precision: step time and compiled peak memory, bfloat16 compute against float32.

For each model (the MLP, the digits CNN, the benchmark transformer LM) one jitted SGD step by
the hand-derived backward (``fnn.backprop.value_and_grad``) of ``mixed_precision(model, p)``
for ``p`` in float32 and bfloat16; repetitions interleaved, medians. Memory is XLA's compiled
estimate (``memory_analysis``: temporaries plus arguments and outputs).

On CPU, XLA computes bfloat16 arithmetic in float32 after converting, so expect no speed-up
there (the point of recording it is the memory and the cost of the casts); on a GPU bfloat16
should be clearly faster.

    python benchmarks/bench_precision.py [--rounds 15] [--models mlp,cnn,lm]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

import fnn.layers as L
from fnn import backprop, losses
from fnn.combinators import serial, stack
from fnn.precision import mixed_precision

LOSS = losses.softmax_cross_entropy_with_integer_labels


def mlp():
    return serial(L.Dense(512), L.Relu(), L.Dense(512), L.Relu(), L.Dense(10)), (128, 784), 10


def cnn():
    return (serial(L.Conv(32, (3, 3)), L.Relu(), L.MaxPool((2, 2)), L.Conv(64, (3, 3)), L.Relu(),
                   L.MaxPool((2, 2)), L.Flatten(), L.Dense(10)), (32, 8, 8, 1), 10)


def lm():
    """The benchmark causal LM: vocab 96, d 128, 4 heads, MLP 512, seq 128, batch 16, depth 4."""
    model = serial(L.Embedding(96, 128), L.PositionalEmbedding(128),
                   stack(L.TransformerBlock(4, 512, causal=True), 4), L.LayerNorm(),
                   L.Dense(96))
    return model, (16, 128), 96


MODELS = {"mlp": mlp, "cnn": cnn, "lm": lm}


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Model name" in l)
    except (OSError, StopIteration):
        return "unknown CPU"


def step_fn(model, spec):
    m = mixed_precision(model, spec)
    vg = backprop.value_and_grad(m, LOSS)

    def step(params, state, x, y):
        (v, new_state), g = vg(params, state, x, y, train=True)
        return jax.tree.map(lambda p, d: p - 1e-3 * d, params, g), new_state, v
    return m, jax.jit(step, donate_argnums=(0,))


def inputs(shape, classes, key):
    kx, ky = jax.random.split(key)
    if len(shape) == 2 and classes == 96:                          # token ids for the LM
        x = jax.random.randint(kx, shape, 0, classes)
        return x, jax.random.randint(ky, shape, 0, classes)
    return jax.random.normal(kx, shape, jnp.float32), jax.random.randint(ky, shape[:1], 0, classes)


def run(name, rounds, inner=3):
    model, shape, classes = MODELS[name]()
    x, y = inputs(shape, classes, jax.random.PRNGKey(1))
    rows, live = {}, {}
    for spec in ("float32", "bfloat16"):
        m, step = step_fn(model, spec)
        params, state, _ = m.init(jax.random.PRNGKey(0), shape)
        mem = step.lower(params, state, x, y).compile().memory_analysis()
        rows[spec] = {"peak": mem.temp_size_in_bytes + mem.argument_size_in_bytes
                      + mem.output_size_in_bytes, "temp": mem.temp_size_in_bytes, "t": []}
        params, state, v = step(params, state, x, y)
        jax.block_until_ready(v)
        live[spec] = [step, params, state]
    for r in range(rounds):
        for spec in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
            step, params, state = live[spec]
            t0 = time.perf_counter()
            for _ in range(inner):
                params, state, v = step(params, state, x, y)
            jax.block_until_ready(v)
            rows[spec]["t"].append((time.perf_counter() - t0) / inner)
            live[spec] = [step, params, state]
    f32, b16 = rows["float32"], rows["bfloat16"]
    med = lambda r: statistics.median(r["t"]) * 1e3
    print(f"| {name} | {med(f32):.1f} ms | {med(b16):.1f} ms | {med(b16) / med(f32):.2f}x | "
          f"{f32['temp'] / 2**20:.1f} / {b16['temp'] / 2**20:.1f} MiB "
          f"({b16['temp'] / max(f32['temp'], 1):.2f}x) | {f32['peak'] / 2**20:.1f} / "
          f"{b16['peak'] / 2**20:.1f} MiB |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--models", default="mlp,cnn,lm")
    a = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), {cpu_model()}")
    print("| model | float32 step | bfloat16 step | ratio | temp memory f32 / bf16 | "
          "args+out+temp f32 / bf16 |")
    print("|---|---|---|---|---|---|")
    for name in a.models.split(","):
        run(name, a.rounds)


if __name__ == "__main__":
    main()
