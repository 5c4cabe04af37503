"""Streaming ``fit`` against in-memory ``fit`` on the digits CNN: step throughput.

The digits CNN of ``fnn train digits-cnn`` (two 3×3 convolutions, max pool, dropout, two dense;
hand-derived gradients, Adam), batch 32, the 1437 training images. In memory: each epoch one
compiled call (shuffle on the device). Streaming: a function ``epoch -> batches`` that shuffles
on the host with NumPy and yields NumPy batches; ``fit`` prefetches them to the device in a
background thread and runs them in compiled chunks of 32 steps. Goal: streaming ≥ 0.9× the
in-memory step throughput. Rounds interleaved (rotating order), medians; float32 on CPU.

    PYTHONPATH=. python benchmarks/bench_stream.py [--rounds 7] [--epochs 2]
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import jax
import numpy as np

from fnn import data, losses, optim, train
from fnn.tasks import digits_cnn

CE = losses.softmax_cross_entropy_with_integer_labels
BATCH = 32


def host_batches(x, y):
    def epoch(e):
        order = np.random.default_rng(e).permutation(len(x))
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            yield x[idx], y[idx]
    return epoch


def main(rounds, epochs):
    (x, y), _ = data.load_digits(image=True)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    net, opt = digits_cnn.model(), optim.adam(1e-3)
    kw = dict(epochs=epochs, step=train.Step(grad="manual"), loop=train.Loop(progress=False))
    ts0 = train.fit(net, CE, opt, (x, y), batch_size=BATCH, key=jax.random.PRNGKey(0),
                    **{**kw, "epochs": 1}).train_state
    state = {"memory": ts0, "stream": ts0}
    source = host_batches(x, y)

    def memory():
        state["memory"] = jax.block_until_ready(train.fit(
            net, CE, opt, (x, y), batch_size=BATCH, train_state=state["memory"],
            **kw).train_state)

    def stream():
        state["stream"] = jax.block_until_ready(train.fit(
            net, CE, opt, source, train_state=state["stream"], **kw).train_state)

    runs = {"in memory": memory, "streaming": stream}
    for f in runs.values():
        f()
    times = {n: [] for n in runs}
    names = list(runs)
    for r in range(rounds):
        for n in names[r % 2:] + names[:r % 2]:
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    steps = epochs * math.ceil(len(x) / BATCH)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{platform.machine()}, jax {jax.__version__}, {rounds} rounds of {epochs} epochs "
          f"({steps} steps)")
    for n, t in med.items():
        print(f"  {n:10s} {1e3 * t / steps:7.3f} ms/step  {steps / t:8.1f} steps/s")
    print(f"  streaming / in-memory throughput: {med['in memory'] / med['streaming']:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    main(a.rounds, a.epochs)
