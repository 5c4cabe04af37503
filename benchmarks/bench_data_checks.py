"""Cost of the label/token-id data checks against one training epoch of the digits CNN.

Times :func:`fnn.checks.check_data` over the 1437 digits training arrays (one abstract
``model.init`` plus a NumPy ``min``/``max``), the per-batch :func:`fnn.checks.data_checker`
over the 45 batches of an epoch (built once, then one call per batch, as a streaming ``fit``
would run it on the host), and one epoch of ``fit`` on the digits CNN (batch 32, hand
backprop; the second epoch, after compilation). Medians of interleaved repetitions.

    python benchmarks/bench_data_checks.py           # 20 check repetitions, 3 epochs
"""
from __future__ import annotations

import platform
import statistics
import time

import jax
import numpy as np

from fnn import checks, data, optim, train
from fnn.tasks import digits_cnn


def _time(f, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(reps=20, epochs=3):
    (x, y), _ = data.load_digits(image=True)
    net, loss = digits_cnn.model(), digits_cnn.LOSS
    whole = _time(lambda: checks.check_data(net, loss, x, y), reps)
    check = checks.data_checker(net, loss, (digits_cnn.BATCH,) + x.shape[1:])
    batches = list(data.batches((x, y), digits_cnn.BATCH, shuffle=False))
    per_batch = _time(lambda: [check(xb, yb) for xb, yb in batches], reps)
    values = _time(lambda: check(x, y), reps)
    result = train.fit(net, loss, optim.adam(1e-3), (x, y), epochs=epochs,
                       batch_size=digits_cnn.BATCH, key=jax.random.PRNGKey(0),
                       step=train.Step(grad="manual"), loop=train.Loop(progress=False))
    epoch = statistics.median(result.history["time"][1:])
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
    print(f"check_data (init + min/max), 1437 examples: {whole * 1e3:.2f} ms")
    print(f"  of which min/max alone:                   {values * 1e3:.3f} ms")
    print(f"per-batch checks, {len(batches)} batches:          {per_batch * 1e3:.2f} ms")
    print(f"one epoch of fit (digits CNN, batch 32):    {epoch * 1e3:.0f} ms")
    print(f"check_data / epoch: {whole / epoch:.2%}; per-batch / epoch: {per_batch / epoch:.2%}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
