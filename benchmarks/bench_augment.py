"""Data augmentation on the digits CNN: test accuracy with and without, over several seeds.

Runs the ``digits-cnn`` task (30 epochs, early stopping on a validation split, the test set
evaluated once) with ``augmented=False`` and ``True`` (``fnn.tasks.digits_cnn.augmentation``:
rotations up to 10° and shifts up to one pixel, per image, inside the compiled epoch) for each
seed, interleaved, and prints the accuracies, their means and the spread.

    python benchmarks/bench_augment.py [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from fnn.tasks import digits_cnn


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    acc = {False: [], True: []}
    with tempfile.TemporaryDirectory() as out:
        for seed in map(int, a.seeds.split(",")):
            for aug in (False, True):
                r = digits_cnn.run(seed=seed, quiet=True, out=out, augmented=aug)
                acc[aug].append(r["test_accuracy"])
                print(f"seed {seed} augmented={aug}: test accuracy {r['test_accuracy']:.4f} "
                      f"({r['errors']} errors, best epoch {r['best_epoch']}, "
                      f"{r['seconds']:.1f} s)", flush=True)
    for aug in (False, True):
        v = acc[aug]
        print(f"augmented={aug}: mean {statistics.mean(v):.4f}, min {min(v):.4f}, "
              f"max {max(v):.4f} over {len(v)} seeds")


if __name__ == "__main__":
    main()
