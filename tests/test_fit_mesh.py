"""fit on a mesh (fnn.sharding.Distribution): in memory against one device on 8 simulated CPU
devices, streamed on 2, and on a one-device mesh here (donation, the compiled epoch reused).
Multi-device runs are subprocesses (the device count is fixed when JAX starts); the
two-process run is in tests/test_sharding.py."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close

from fnn import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "sharding_workers")


def _env():
    """The children's environment with the suite's fast-compile flags (conftest.py: the same
    HLO passes and IEEE arithmetic); the MLP cases agree with one device to 3e-8 under these
    and under XLA's defaults alike (see test_sharding.py for the one model that does not)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full = os.environ.get("FNN_SHARDING_FULL")            # its LM cases: XLA's defaults
    env["XLA_FLAGS"] = "" if full else os.environ.get("FNN_TEST_FAST_COMPILE_FLAGS", "")
    return env


def _mesh(shape=(1, 1), names=("data", "model")):
    return sharding.make_mesh(shape, names)


FIT_CASES = [("mlp", "autodiff", "dp"), ("mlp", "manual", "tp"), ("mlp", "manual", "fsdp")]
if os.environ.get("FNN_SHARDING_FULL"):         # every model, mesh and gradient path (minutes)
    FIT_CASES = [(m, g, k) for m in ("mlp", "cnn", "lm", "lstm") for g in ("autodiff", "manual")
                 for k in ("dp", "tp", "fsdp")]


@pytest.mark.slow
def test_fit_on_a_mesh_matches_fit_on_one_device():
    """``fit(distribution=Distribution(mesh, params=rules))`` (no shuffle) gives the one-device
    ``fit``'s parameters
    to 1e-5 after 20 Adam steps, with params and moments sharded as asked; a shuffled run
    (within shards) trains."""
    r = subprocess.run([sys.executable, os.path.join(WORKERS, "fit_equivalence.py"),
                        json.dumps(FIT_CASES)], capture_output=True, text=True, env=_env(),
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got["cases"]) == len(FIT_CASES)
    for c in got["cases"]:
        assert c["steps"] == 20, c
        assert c["max_diff"] < 1e-5, c
        assert c["params_sharded_as_asked"] and c["opt_state_like_params"], c
        assert (c["split_params"] > 0) == (c["mesh"] != "dp"), c
    assert got["shuffled_trains"]


_TRACES = []


def test_fit_on_a_mesh_donates_keeps_callers_state_and_reuses_its_compiled_epoch(key):
    """On a one-device mesh: the same parameters as plain fit, the caller's arrays intact, and
    a second call (fresh optimizer and mesh objects, equal values) traces nothing."""
    from fnn import losses, optim, train
    from fnn.layers import Dense, Tanh, serial
    model, traces = serial(Dense(4), Tanh(), Dense(2)), _TRACES

    def loss(pred, target, **kw):
        _TRACES.append(1)                  # a global: the closure does not change with it
        return losses.mse(pred, target, **kw)
    r = np.random.default_rng(0)
    x, t = jnp.asarray(r.normal(size=(32, 3))), jnp.asarray(r.normal(size=(32, 2)))
    params = model.init(key, (8, 3))[0]
    start = lambda: train.create_train_state(model, optim.adam(1e-2), key, (8, 3), params=params)
    kw = dict(epochs=2, batch_size=8, loop=train.Loop(shuffle=False, progress=False))
    on_mesh = lambda: sharding.Distribution(_mesh((1,), ("data",)))
    ref = train.fit(model, loss, optim.adam(1e-2), (x, t), train_state=start(), **kw)
    runs = [train.fit(model, loss, optim.adam(1e-2), (x, t), train_state=start(),
                      distribution=on_mesh(), **kw) for _ in range(2)]
    n = len(traces)
    third = train.fit(model, loss, optim.adam(1e-2), (x, t), train_state=start(),
                      distribution=on_mesh(), **kw)
    assert len(traces) == n                                   # no new trace: cached
    for got in runs + [third]:
        assert_trees_close(got.train_state.params, ref.train_state.params, rtol=1e-12, atol=1e-12)
    assert not any(a.is_deleted() for a in jax.tree.leaves(params))


def test_fit_streams_on_a_mesh_as_on_one_device():
    """A stream of batches (the partial last one included, streamed validation) on 2 simulated
    CPU devices with FSDP: the one-device parameters to 1e-6 and its history; each batch
    checked as it comes; a batch that does not split over the devices is refused."""
    r = subprocess.run([sys.executable, os.path.join(WORKERS, "stream_mesh.py")],
                       capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["max_diff"] < 1e-6 and got["history_rel"] < 1e-5, got
    assert got["steps"] == 14 and got["epochs"] == [1, 2], got
    assert "P(None, 'data')" in got["specs"], got                # FSDP split a weight
    assert re.search(r"fit: a streamed batch of 3 examples does not split over this "
                     r"process's 2 'data' devices", got["errors"]["odd"]), got
    assert re.search(r"fit: train_data \(batch 2 of the epoch\): x holds 1 non-finite",
                     got["errors"]["nan"]), got
