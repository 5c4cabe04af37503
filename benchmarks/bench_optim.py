"""Jitted optimizer update time: fnn.optim against optax on a ~10M-parameter tree of ~100 leaves.

Each optimizer's ``update(grads, state, params)`` is jitted once per library, warmed up, then
timed in interleaved repetitions (fnn, optax, optax, fnn, ...) so that machine load falls on
both alike; the medians and their ratio (fnn / optax) are printed. Goal: ratio <= 1.05. The
last column compares the two compiled programs instruction by instruction (type and opcode):
"same as optax" means XLA runs the same operations, so any time difference is noise.

    python benchmarks/bench_optim.py            # 10M params, 100 leaves, 30 repetitions
    python benchmarks/bench_optim.py --quick    # same tree, 7 repetitions
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fnn.optim as fo

MASK = fo.not_named("b")
OPTIMIZERS = {  # name: (fnn, optax)
    "sgd": (fo.sgd(1e-2), optax.sgd(1e-2)),
    "sgd_momentum": (fo.sgd(1e-2, 0.9), optax.sgd(1e-2, 0.9)),
    "adagrad": (fo.adagrad(1e-2), optax.adagrad(1e-2)),
    "rmsprop": (fo.rmsprop(1e-3), optax.rmsprop(1e-3)),
    "adam": (fo.adam(1e-3), optax.adam(1e-3)),
    "adamw_masked": (fo.adamw(1e-3, weight_decay=1e-2, mask=MASK),
                     optax.adamw(1e-3, weight_decay=1e-2,
                                 mask=lambda p: fo.resolve_mask(MASK, p))),
    "adamax": (fo.adamax(1e-3), optax.adamax(1e-3)),
    "nadam": (fo.nadam(1e-3), optax.nadam(1e-3)),
    "lion": (fo.lion(1e-4), optax.lion(1e-4)),
    "adam_clip_cosine": (
        fo.chain(fo.clip_by_global_norm(1.0),
                 fo.adam(fo.schedules.warmup_cosine(0.0, 1e-3, 100, 1000))),
        optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000)))),
}


def make_tree(n_params: int, n_leaves: int, seed: int = 0):
    """``n_leaves // 2`` layers of a square ``w`` and a ``b``, ~``n_params`` float32 in all."""
    layers = n_leaves // 2
    width = int((n_params / layers) ** 0.5)
    rng = np.random.default_rng(seed)
    def leaf(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    return {f"layer{i:02d}": {"w": leaf(width, width), "b": leaf(width)} for i in range(layers)}


def time_call(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def hlo_ops(compiled) -> Counter:
    """The compiled program's instructions as a multiset of (result type, opcode)."""
    found = (re.search(r"=\s*(\S+)\s+([a-z][\w-]*)\(", line)
             for line in compiled.as_text().splitlines())
    return Counter(m.groups() for m in found if m)


def bench(ours, theirs, params, grads, reps):
    """Median ms per jitted update for each library, and the op-count difference."""
    fns, ops = {}, {}
    for lib, opt in (("fnn", ours), ("optax", theirs)):
        state = opt.init(params)
        fn = jax.jit(opt.update).lower(grads, state, params).compile()
        jax.block_until_ready(fn(grads, state, params))  # warm up
        fns[lib], ops[lib] = (fn, state), hlo_ops(fn)
    times = {"fnn": [], "optax": []}
    for r in range(reps):
        order = ("fnn", "optax") if r % 2 == 0 else ("optax", "fnn")
        for lib in order:
            fn, state = fns[lib]
            times[lib].append(time_call(fn, grads, state, params))
    diff = sum(((ops["fnn"] - ops["optax"]) + (ops["optax"] - ops["fnn"])).values())
    return {lib: statistics.median(ts) * 1e3 for lib, ts in times.items()}, diff


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="7 repetitions instead of 30")
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--leaves", type=int, default=100)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="optimizer names to run")
    args = ap.parse_args(argv)
    reps = args.reps or (7 if args.quick else 30)

    params = make_tree(args.params, args.leaves)
    grads = make_tree(args.params, args.leaves, seed=1)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"fnn.optim vs optax {optax.__version__}, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}, {cpu_model()}")
    print(f"{n:,} float32 params in {len(jax.tree.leaves(params))} leaves; "
          f"jitted update, median of {reps} interleaved repetitions\n")
    print(f"{'optimizer':<18}{'fnn ms':>10}{'optax ms':>10}{'ratio':>8}  compiled ops")
    ratios = []
    for name, (ours, theirs) in OPTIMIZERS.items():
        if args.only and name not in args.only:
            continue
        t, diff = bench(ours, theirs, params, grads, reps)
        ratios.append(t["fnn"] / t["optax"])
        same = "same as optax" if diff == 0 else f"{diff} differ"
        print(f"{name:<18}{t['fnn']:>10.2f}{t['optax']:>10.2f}{ratios[-1]:>8.3f}  {same}",
              flush=True)
    print(f"\ngeometric-mean ratio {np.exp(np.mean(np.log(ratios))):.3f} "
          f"(goal <= 1.05), worst {max(ratios):.3f}")


if __name__ == "__main__":
    main()
