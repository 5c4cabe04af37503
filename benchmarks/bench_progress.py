"""The cost of showing an epoch's steps from inside the compiled epoch (issue #26).

``fnn train digits-cnn``'s model and training step (hand backward, augmentation, Adam) on
sklearn's digits, the progress bar on (stderr to /dev/null): ``fit`` with the in-epoch step
reports (a host callback between segments of steps, paced by
``fnn.train.progress.tick_every``: the first epoch 20 reports, later ones about 4 a second)
against the same bar with the reports compiled out. Goal: ≤ 2% of an epoch.

Rounds interleaved (rotating order), medians; each round one ``fit`` of ``--epochs`` epochs;
reported: the whole call, the first epoch (20 reports) and the median epoch after the first
(from the history; an epoch launched ahead overlaps the previous one's bookkeeping, so compare
whole calls). As ``fnn train digits-cnn`` runs: validation data and early stopping
(``--no-val``: neither).

    PYTHONPATH=. python benchmarks/bench_progress.py [--rounds 5] [--epochs 4] [--no-val]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import jax

from fnn import data, optim, train
from fnn.tasks import digits_cnn as task
from fnn.train import fitting


def run_fit(xy, epochs, ticks, val=None):
    """One fit with the bar on; ``ticks=False`` compiles the epoch without its reports;
    ``val``: validation data, with early stopping as ``fnn train digits-cnn`` has it."""
    real = fitting.shows_steps
    fitting.shows_steps = real if ticks else (lambda progress: False)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            t0 = time.perf_counter()
            res = train.fit(task.model(), task.LOSS, optim.adam(task.LR), xy, epochs=epochs,
                            batch_size=task.BATCH, key=jax.random.PRNGKey(0),
                            step=train.Step(grad="manual", augment=task.augmentation()),
                            loop=train.Loop(progress=True), val_data=val,
                            callbacks=[train.EarlyStopping(task.PATIENCE)] if val else [])
            jax.block_until_ready(res.train_state)
            return time.perf_counter() - t0, res.history["time"]
    finally:
        fitting.shows_steps = real


def main(rounds, epochs, val):
    (x, y), _ = data.load_digits(image=True)
    xy, val_xy = data.split((x, y), task.VAL_FRACTION, seed=0)
    val_xy = val_xy if val else None
    names = {"bar, steps reported from inside the epoch": True, "bar, epochs only": False}
    for ticks in names.values():                          # compile both
        run_fit(xy, 1, ticks, val_xy)
    call, epoch, first = {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
    order = list(names)
    for r in range(rounds):
        for n in order[r % 2:] + order[:r % 2]:
            t, times = run_fit(xy, epochs, names[n], val_xy)
            call[n].append(t)
            epoch[n].extend(times[1:])
            first[n].append(times[0])
    steps = -(-len(xy[0]) // task.BATCH)
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {rounds} "
          f"rounds of {epochs} epochs, {steps} steps per epoch, validation and early stopping "
          f"{'on' if val else 'off'}", file=sys.stdout)
    base = [statistics.median(d[order[1]]) for d in (call, first, epoch)]
    for n in order:
        c, f, e = (statistics.median(d[n]) for d in (call, first, epoch))
        print(f"  {n:44s} call {c:7.3f} s ({c / base[0]:.3f})   first epoch {1e3 * f:8.1f} ms "
              f"({f / base[1]:.3f})   later epochs {1e3 * e:8.1f} ms ({e / base[2]:.3f})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--no-val", action="store_true",
                    help="no validation data and no early stopping (nothing to overlap)")
    a = ap.parse_args()
    main(a.rounds, a.epochs, not a.no_val)
