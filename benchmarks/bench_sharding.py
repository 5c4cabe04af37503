"""Sharding benchmark: data-parallel step time on 1 vs 2 CPU devices, the sharded step's
overhead on one device, and FSDP vs data-parallel memory per device.

(a) One train step (Adam, hand-derived gradients via ``fnn.backprop.value_and_grad``,
    float32) of the digits CNN (``fnn.tasks.digits_cnn.model()``, batch 64) and the benchmark
    transformer LM (``fnn.models.GPT``: vocab 96, d 128, 4 heads, MLP 512, seq 128, batch 16,
    depth 4), compiled by :func:`fnn.sharding.make_sharded_step` on a (1,) and a (2,) data
    mesh, and as a plain ``jax.jit(step, donate_argnums=0)`` on one device. The ratio
    sharded(1 device) / plain is the overhead of the sharded path (goal ≤ 1.02×).
(c) Whole ``fit`` calls (digits CNN, 1024 examples, batch 64, 2 epochs, Adam, hand
    gradients, state donated) with ``mesh=`` a (1,) data mesh against plain ``fit`` on one
    device: the sharded path's overhead as a user sees it (goal ≤ 1.02×).
(b) Memory per device from XLA's compiled ``memory_analysis()`` (arguments + outputs + temp,
    aliased donations counted once) of one step of an MLP whose parameters dominate
    (4 × Dense 1024, batch 8) on 4 devices: data parallel (params and Adam moments
    replicated) against FSDP (``fsdp("data")``).

Repetitions interleave the contenders (rotating order), medians reported. The process starts
with 4 simulated CPU devices (``jax_num_cpu_devices``); the (1,) and (2,) meshes use the first
one and two.

    python benchmarks/bench_sharding.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp                                     # noqa: E402
import numpy as np                                          # noqa: E402

from fnn import backprop, losses, optim, sharding           # noqa: E402
from fnn.layers import Dense, Relu, serial                  # noqa: E402
from fnn.models import GPT                                  # noqa: E402
from fnn.tasks import digits_cnn                            # noqa: E402

CE = losses.softmax_cross_entropy_with_integer_labels


def make_step(model, state, opt):
    vg = backprop.value_and_grad(model, CE)

    def step(s, batch):
        (value, _), g = vg(s[0], state, *batch, key=jax.random.PRNGKey(0), train=True)
        upd, o = opt.update(g, s[1], s[0])
        return (jax.tree.map(jnp.add, s[0], upd), o), value
    return step


def contenders(model, x, t, rules=None):
    opt = optim.adam(1e-3)
    params, state, _ = model.init(jax.random.PRNGKey(0), x.shape)
    step = make_step(model, state, opt)
    out = {}
    plain = jax.jit(step, donate_argnums=0)
    out["plain jit, 1 device"] = (plain, lambda: (jax.tree.map(jnp.copy, params),
                                                  opt.init(params)), lambda: (x, t))
    for n in (1, 2):
        mesh = sharding.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        sp = sharding.param_shardings(params, mesh, rules)
        shard = (sp, sharding.opt_state_shardings(opt.init(params), sp, mesh))
        run = sharding.make_sharded_step(step, mesh, shard)
        out[f"sharded, {n} device{'s' * (n > 1)}"] = (
            run, lambda shard=shard: jax.device_put(
                jax.tree.map(jnp.copy, (params, opt.init(params))), shard),
            lambda mesh=mesh: sharding.shard_batch((x, t), mesh))
    return out


def time_steps(cands, rounds, steps):
    live = {k: [mk_state(), mk_batch()] for k, (_, mk_state, mk_batch) in cands.items()}
    for k, (f, _, _) in cands.items():                      # compile + warm
        live[k][0], v = f(*live[k])
        jax.block_until_ready(v)
    times = {k: [] for k in cands}
    names = list(cands)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f = cands[k][0]
            t0 = time.perf_counter()
            for _ in range(steps):
                live[k][0], v = f(*live[k])
            jax.block_until_ready((live[k][0], v))
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def report(name, med):
    print(f"\n{name}")
    base = med["plain jit, 1 device"]
    for k, v in med.items():
        print(f"  {k:24s} {v * 1e3:8.2f} ms/step   {v / base:5.3f}x plain")
    print(f"  speed-up 2 vs 1 device (sharded): "
          f"{med['sharded, 1 device'] / med['sharded, 2 devices']:.2f}x")


def memory(rounds_unused=None):
    model = serial(*[l for _ in range(4) for l in (Dense(1024), Relu())], Dense(10))
    x = jnp.zeros((8, 1024), jnp.float32)
    t = jnp.zeros((8,), jnp.int32)
    opt = optim.adam(1e-3)
    params, state, _ = model.init(jax.random.PRNGKey(0), x.shape)
    step = make_step(model, state, opt)
    mesh = sharding.make_mesh((4,), ("data",))
    print("\nmemory per device, MLP 4 x Dense(1024) + Adam, batch 8, 4 devices:")
    for name, rules in (("data parallel", None), ("FSDP", sharding.fsdp("data"))):
        sp = sharding.param_shardings(params, mesh, rules)
        shard = (sp, sharding.opt_state_shardings(opt.init(params), sp, mesh))
        run = jax.jit(step, in_shardings=(shard, sharding.batch_sharding(mesh)),
                      out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=0)
        m = run.lower((params, opt.init(params)), (x, t)).compile().memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)
        print(f"  {name:14s} args {m.argument_size_in_bytes / 2**20:6.1f} MiB  temp "
              f"{m.temp_size_in_bytes / 2**20:6.1f} MiB  total {total / 2**20:6.1f} MiB")


def fit_overhead(rounds):
    from fnn import train
    r = np.random.default_rng(1)
    x = jnp.asarray(r.random((1024, 8, 8, 1)), jnp.float32)
    t = jnp.asarray(r.integers(0, 10, 1024), jnp.int32)
    model = digits_cnn.model()
    mesh = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    kw = dict(epochs=2, batch_size=64, key=jax.random.PRNGKey(0), step=train.Step(grad="manual"),
              loop=train.Loop(progress=False, check_data=False))
    cands = {"plain fit": {}, "fit(mesh=(1,))": {"distribution": sharding.Distribution(mesh)}}

    def once(extra):
        res = train.fit(model, CE, optim.adam(1e-3), (x, t), **kw, **extra)
        jax.block_until_ready(res.train_state.params)
    for extra in cands.values():                             # compile (cached across calls)
        once(extra)
    times, names = {k: [] for k in cands}, list(cands)
    for i in range(rounds * 2):
        for k in names[i % 2:] + names[:i % 2]:
            t0 = time.perf_counter()
            once(cands[k])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\nfit, digits CNN, 1024 examples, batch 64, 2 epochs per call:")
    for k, v in med.items():
        print(f"  {k:16s} {v * 1e3:8.1f} ms/call   {v / med['plain fit']:5.3f}x plain fit")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only-fit", action="store_true", help="part (c) only")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True).stdout.split(":")[-1].strip()
    print(f"jax {jax.__version__}, {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    r = np.random.default_rng(0)
    x = jnp.asarray(r.random((64, 8, 8, 1)), jnp.float32)
    t = jnp.asarray(r.integers(0, 10, 64), jnp.int32)
    if args.only_fit:
        return fit_overhead(args.rounds)
    report("digits CNN, batch 64", time_steps(contenders(digits_cnn.model(), x, t),
                                              args.rounds, 20))
    tok = jnp.asarray(r.integers(0, 96, (16, 128)), jnp.int32)
    lm = GPT(96, 128, 4, 4, 512, 128)
    report("transformer LM (d 128, depth 4, seq 128), batch 16",
           time_steps(contenders(lm, tok, tok), args.rounds, 3))
    fit_overhead(args.rounds)
    memory()
    print(f"\nload after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
