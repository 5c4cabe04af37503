"""Worker for tests/test_sharding.py: ``fit`` on a stream of batches over 2 simulated CPU
devices against the same ``fit`` on one device, printing JSON.

A small MLP (float32, Adam), 2 epochs of 6 batches of 8 then one of 4 (the partial batch
runs as its own chunk), streamed validation, FSDP rules on the mesh: the largest parameter
difference, the history's largest relative difference, where the params ended up, and the
errors for a batch that does not split over the devices and for a NaN in a batch.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=2"
import jax                                                         # noqa: E402
import numpy as np                                                 # noqa: E402

from fnn import losses, optim, sharding, train                    # noqa: E402
from fnn.layers import Dense, Tanh, serial                         # noqa: E402


def batches(x, t, sizes):
    out, at = [], 0
    for b in sizes:
        out.append((x[at:at + b], t[at:at + b]))
        at += b
    return out


def main():
    r = np.random.default_rng(0)
    x, t = r.normal(size=(52, 8)).astype("f4"), r.normal(size=(52, 4)).astype("f4")
    model = serial(Dense(32), Tanh(), Dense(4))
    src = lambda epoch: batches(x, t, [8] * 6 + [4])
    val = lambda epoch: batches(x[:16], t[:16], [8, 8])
    kw = dict(epochs=2, key=jax.random.PRNGKey(1), val_data=val,
              loop=train.Loop(chunk=4, progress=False))
    ref = train.fit(model, losses.mse, optim.adam(1e-2), src, **kw)
    mesh = sharding.make_mesh((2,), ("data",))
    dist = sharding.Distribution(mesh, params=sharding.fsdp("data", min_size=64))
    got = train.fit(model, losses.mse, optim.adam(1e-2), src, distribution=dist, **kw)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got.train_state.params),
                               jax.tree.leaves(ref.train_state.params)))
    hist = max(abs(a - b) / max(abs(b), 1e-12) for k in ("loss", "val_loss")
               for a, b in zip(got.history[k], ref.history[k]))
    specs = [str(a.sharding.spec) for a in jax.tree.leaves(got.train_state.params)]
    errors = {}
    try:
        train.fit(model, losses.mse, optim.adam(1e-2), lambda e: batches(x, t, [8, 3]),
                  distribution=dist, **{**kw, "val_data": None})
    except ValueError as e:
        errors["odd"] = str(e)
    bad = x.copy()
    bad[9, 0] = np.nan
    try:
        train.fit(model, losses.mse, optim.adam(1e-2), lambda e: batches(bad, t, [8] * 6),
                  distribution=dist, **{**kw, "val_data": None})
    except ValueError as e:
        errors["nan"] = str(e)
    print(json.dumps({"max_diff": diff, "history_rel": hist, "specs": specs,
                      "steps": int(got.train_state.step), "epochs": got.history["epoch"],
                      "errors": errors}))


if __name__ == "__main__":
    main()
    sys.exit(0)
