"""Worker for tests/test_sharding.py: two processes × 2 CPU devices against one × 4.

``python -m fnn.sharding.launch -n 2 --cpu-devices 2 -- python two_processes.py multi OUT``:
one of two processes (gloo collectives on localhost); trains an MLP for 20 FSDP steps over
a (4,) data mesh spanning both processes, each process feeding its half of every batch;
saves a sharded checkpoint to OUT/ckpt from both processes; process 0 writes the gathered
params to OUT/multi.npz.
Then both processes run ``fit(distribution=...)`` (FSDP, 3 epochs, progress lines, a backup
directory each: OUT/fit-P) on the same in-memory data; process 0 writes the params to
OUT/fit.npz. Then a streamed ``fit``: each process feeds its half of every batch; process 0
writes the step count and params to OUT/stream.npz (compared with one device).
``two_processes.py single OUT``: one process, 4 devices, the same training and the same
``fit``; restores OUT/ckpt onto 2 devices; prints JSON comparing both.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

STEPS, BATCH, N = 20, 16, 64


def setup(role):
    from fnn.sharding.launch import initialize
    if role == "multi":             # started by fnn.sharding.launch: FNN_* variables
        assert initialize(timeout=60)
    else:
        jax.config.update("jax_num_cpu_devices", 4)


def train(mesh, feed):
    from fnn import backprop, losses, optim, sharding
    from fnn.layers import Dense, Tanh, serial
    model, opt = serial(Dense(32), Tanh(), Dense(4)), optim.adam(1e-3)
    rules = sharding.fsdp("data", min_size=32)
    params, mstate, _ = model.init(jax.random.PRNGKey(1), (BATCH, 8))
    params = sharding.shard_params(params, mesh, rules)
    state = (params, sharding.shard_opt_state(opt, params, mesh))
    shard = (sharding.param_shardings(params, mesh, rules),
             sharding.opt_state_shardings(state[1], params, mesh))
    vg = backprop.value_and_grad(model, losses.mse)

    def step(s, batch):
        (value, _), g = vg(s[0], mstate, *batch)
        upd, o = opt.update(g, s[1], s[0])
        return (jax.tree.map(jnp.add, s[0], upd), o), value
    run = sharding.make_sharded_step(step, mesh, shard)
    r = np.random.default_rng(0)
    x, t = r.normal(size=(N, 8)).astype("f4"), r.normal(size=(N, 4)).astype("f4")
    for i in range(STEPS):
        rows = slice((i * BATCH) % N, (i * BATCH) % N + BATCH)
        state, _ = run(state, feed((x[rows], t[rows])))
    return state, shard, rules


def fit_run(mesh, out):
    from fnn import losses, optim, sharding
    from fnn.layers import Dense, Tanh, serial
    from fnn.train import BackupAndRestore, Loop, Step, fit
    r = np.random.default_rng(1)
    x, t = r.normal(size=(N, 8)).astype("f4"), r.normal(size=(N, 4)).astype("f4")
    return fit(serial(Dense(32), Tanh(), Dense(4)), losses.mse, optim.adam(1e-2), (x, t),
               epochs=3, batch_size=BATCH, key=jax.random.PRNGKey(2),
               distribution=sharding.Distribution(mesh, params=sharding.fsdp("data",
                                                                             min_size=32)),
               step=Step(grad="manual"), loop=Loop(progress="lines"),
               callbacks=[BackupAndRestore(out)] if out else [])


def stream_run(mesh, part, parts):
    """3 epochs of 4 streamed batches of BATCH; this process feeds rows ``part`` of
    ``parts`` of each batch (all of them: ``parts=1``); ``mesh=None``: one device."""
    from fnn import losses, optim, sharding
    from fnn.layers import Dense, Tanh, serial
    from fnn.train import Loop, fit
    r = np.random.default_rng(3)
    x, t = r.normal(size=(N, 8)).astype("f4"), r.normal(size=(N, 4)).astype("f4")
    h = BATCH // parts
    src = lambda epoch: [(x[i + part * h:i + (part + 1) * h], t[i + part * h:i + (part + 1) * h])
                         for i in range(0, N, BATCH)]
    dist = None if mesh is None else sharding.Distribution(mesh, params=sharding.fsdp(
        "data", min_size=32))
    return fit(serial(Dense(32), Tanh(), Dense(4)), losses.mse, optim.adam(1e-2), src,
               epochs=3, key=jax.random.PRNGKey(4), distribution=dist,
               loop=Loop(progress=False, chunk=2))


def mesh_of(devices):
    from fnn import sharding
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return sharding.make_mesh((len(devices),), ("data",), devices=devices)


def multi(out):
    from jax.experimental import multihost_utils
    from fnn import sharding
    from fnn.sharding import checkpoint
    mesh = mesh_of(jax.devices())
    p, n = jax.process_index(), jax.process_count()
    half = BATCH // n
    feed = lambda b: sharding.process_local_batch(
        jax.tree.map(lambda a: a[p * half:(p + 1) * half], b), mesh)
    state, _, _ = train(mesh, feed)
    checkpoint.save(os.path.join(out, "ckpt"), state)
    params = multihost_utils.process_allgather(state[0], tiled=True)
    if p == 0:
        np.savez(os.path.join(out, "multi.npz"), *jax.tree.leaves(params))
    from fnn.train.distributed import to_host
    result = fit_run(mesh, os.path.join(out, f"fit-{p}"))
    fitted = to_host(result.train_state.params)                  # every process joins
    if p == 0:
        np.savez(os.path.join(out, "fit.npz"), *jax.tree.leaves(fitted))
    streamed = stream_run(mesh, p, n).train_state          # whole on every process
    if p == 0:
        np.savez(os.path.join(out, "stream.npz"), int(streamed.step),
                 *jax.tree.leaves(streamed.params))
    jax.distributed.shutdown()


def single(out):
    from fnn import sharding
    from fnn.sharding import checkpoint
    mesh = mesh_of(jax.devices())
    state, shard, rules = train(mesh, lambda b: sharding.shard_batch(b, mesh))
    ref = [np.asarray(a) for a in jax.tree.leaves(state[0])]
    got = np.load(os.path.join(out, "multi.npz"))
    multi_params = [got[f"arr_{i}"] for i in range(len(ref))]
    small = mesh_of(jax.devices()[:2])
    small_params = sharding.param_shardings(state[0], small, rules)
    like_sh = (small_params, sharding.opt_state_shardings(state[1], small_params, small))
    back = checkpoint.restore(os.path.join(out, "ckpt"), state, like_sh)
    fitted = [np.asarray(a) for a in jax.tree.leaves(fit_run(mesh, None).train_state.params)]
    got_fit = np.load(os.path.join(out, "fit.npz"))
    one = [np.asarray(a) for a in jax.tree.leaves(stream_run(None, 0, 1).train_state.params)]
    got_stream = np.load(os.path.join(out, "stream.npz"))
    print(json.dumps({
        "stream_max_diff": max(float(np.max(np.abs(a - got_stream[f"arr_{i + 1}"])))
                               for i, a in enumerate(one)),
        "stream_steps": int(got_stream["arr_0"]),
        "fit_max_diff": max(float(np.max(np.abs(a - got_fit[f"arr_{i}"])))
                            for i, a in enumerate(fitted)),
        "fit_dirs": sorted(d for d in os.listdir(out) if d.startswith("fit-")),
        "train_max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(ref, multi_params)),
        "restore_bit_exact": all(np.array_equal(np.asarray(a), b)
                                 for a, b in zip(jax.tree.leaves(back[0]), multi_params)),
        "restored_devices": sorted({d.id for a in jax.tree.leaves(back) for d in
                                    a.sharding.device_set}),
        "shard_files": sorted(f for v in os.listdir(os.path.join(out, "ckpt")) if v.startswith("v-")
                             for f in os.listdir(os.path.join(out, "ckpt", v))),
    }))


if __name__ == "__main__":
    role = sys.argv[1]
    setup(role)
    (multi if role == "multi" else single)(sys.argv[-1])
