"""fnn.sharding on several devices, equal to one device: training and ``fit`` on 8 simulated CPU
devices, and 2 processes × 2 devices against 1 × 4; also ``fnn.sharding.launch`` and the default
mesh. (Rules, data and checkpoints on the suite's one device are in test_sharding_rules.py,
test_sharding_data.py and test_sharding_checkpoint.py; ``fit`` on a mesh in test_fit_mesh.py.)

The multi-device checks run in subprocesses (the device count is fixed when JAX starts):
``sharding_workers/train_equivalence.py`` on 8 simulated CPU devices (one process: every
model, mesh and gradient path at once, so start-up and compilation are paid once), and
``sharding_workers/two_processes.py`` as two processes × 2 devices against one × 4.
"""
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from fnn import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "sharding_workers")
# each (model, mesh) once, every gradient path several times; FNN_SHARDING_FULL=1: all 24
CASES = [("mlp", "autodiff", "dp", True), ("mlp", "manual", "tp", False),
         ("mlp", "custom_vjp", "fsdp", False), ("cnn", "manual", "dp", False),
         ("cnn", "autodiff", "tp", False), ("cnn", "manual", "fsdp", False),
         ("lm", "autodiff", "dp", False), ("lm", "manual", "tp", False),
         ("lm", "manual", "fsdp", False), ("lstm", "manual", "dp", False),
         ("lstm", "autodiff", "tp", False), ("lstm", "autodiff", "fsdp", False)]
if os.environ.get("FNN_SHARDING_FULL"):
    CASES = [(m, g, k, False) for m in ("mlp", "cnn", "lm", "lstm")
             for g in ("autodiff", "manual") for k in ("dp", "tp", "fsdp")]


def _env():
    """The children's environment with the suite's fast-compile flags (conftest.py: the same
    HLO passes and IEEE arithmetic, 2-4x faster compiles)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = os.environ.get("FNN_TEST_FAST_COMPILE_FLAGS", "")
    return env


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt8")
    r = subprocess.run([sys.executable, os.path.join(WORKERS, "train_equivalence.py"),
                        json.dumps(CASES), str(tmp / "ckpt")], capture_output=True, text=True,
                       env=_env(), timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_training_matches_one_device(eight):
    """20 Adam steps (float32, eps 1e-6) on (8,) data, (4, 2) data×model and FSDP meshes give the
    one-device parameters to 1e-5, with params and moments where the rules put them."""
    assert len(eight["cases"]) == len(CASES)
    for c in eight["cases"]:
        assert c["steps"] == 20, c
        assert c["max_diff"] < 1e-5, c
        assert c["params_sharded_as_asked"] and c["opt_state_like_params"], c
        assert (c["split_params"] > 0) == (c["mesh"] != "dp"), c


@pytest.mark.slow
def test_checkpoint_saved_on_8_restored_on_2_and_1(eight):
    for n, r in eight["checkpoint"].items():
        assert r["bit_exact"], (n, r)
        assert r["devices"] == list(range(int(n))), (n, r)
    assert eight["checkpoint"]["2"]["split"] > 0


@pytest.mark.slow
def test_per_shard_shuffle_moves_no_data(eight):
    """The compiled epoch has no collective of the data set's shape; a global permutation of
    the same batch-sharded data has one (the check can fail)."""
    assert eight["shuffle"]["per_shard"] == []
    assert len(eight["shuffle"]["global"]) >= 1


@pytest.mark.slow
def test_bad_input_on_eight_devices(eight):
    e = eight["errors"]
    assert re.search(r"shard_batch: batch size 6 is not divisible by the 4 devices", e["batch"])
    assert re.search(r"shard_params: parameter 'w' of shape \(3, 5\) cannot be split",
                     e["split"])
    assert re.search(r"shard_shuffle: 10 examples and batch size 8 must both be multiples",
                     e["shuffle"])


# --------------------------------------------------------------------------- two processes

@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """2 processes × 2 CPU devices (gloo), started by fnn.sharding.launch, train as 1 × 4 to
    1e-6, with a hand-written step and with ``fit(distribution=)`` on arrays and on streams
    (each process feeding its half of each batch); their checkpoint, saved by both,
    restores bit-exact in one process onto 2 devices; fit's progress lines and resume file
    are written by process 0 only."""
    from fnn.sharding.launch import launch_local
    worker = os.path.join(WORKERS, "two_processes.py")
    with open(tmp_path / "log.txt", "w") as log:
        codes = launch_local([sys.executable, worker, "multi", str(tmp_path)], 2,
                             cpu_devices=2, timeout=300, env=_env(), cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT)
    text = (tmp_path / "log.txt").read_text()
    if any(codes):
        if re.search(r"gloo", text, re.I) and re.search(r"not (available|supported|built)|"
                                                        r"unknown|invalid", text, re.I):
            pytest.skip(f"this jaxlib has no gloo CPU collectives: {text[-300:]}")
        pytest.fail(f"exit codes {codes} (-9: killed at the 300 s timeout)\n{text[-3000:]}")
    r = subprocess.run([sys.executable, worker, "single", str(tmp_path)], capture_output=True,
                       text=True, env=_env(), timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["train_max_diff"] < 1e-6, got
    assert got["restore_bit_exact"], got
    assert got["restored_devices"] == [0, 1], got
    assert got["shard_files"] == ["shards-00000.safetensors", "shards-00001.safetensors"]
    assert got["fit_max_diff"] < 1e-6, got
    assert got["stream_max_diff"] < 1e-6 and got["stream_steps"] == 12, got
    assert got["fit_dirs"] == ["fit-0"], got                 # process 1 wrote no resume file
    assert len(re.findall(r"^epoch 1/3 ", text, re.M)) == 1, text[-2000:]
    assert len(re.findall(r"^epoch 3/3 ", text, re.M)) == 1, text[-2000:]


# --------------------------------------------------------------------------- one device

def test_initialize_without_a_coordinator_does_nothing(monkeypatch):
    from fnn.sharding.launch import initialize
    for v in ("FNN_COORDINATOR", "FNN_NUM_PROCESSES", "FNN_PROCESS_ID", "FNN_CPU_DEVICES"):
        monkeypatch.delenv(v, raising=False)
    assert initialize() is False
    with pytest.raises(ValueError, match=r"initialize: coordinator 'localhost:1' given but "
                                         r"not FNN_NUM_PROCESSES"):
        initialize("localhost:1")
    with pytest.raises(ValueError, match=r"initialize: process id 2 not in \[0, 2\)"):
        initialize("localhost:1", 2, 2)


def test_launch_local_runs_each_process_with_its_id(tmp_path):
    from fnn.sharding.launch import launch_local
    code = ("import os; open(os.path.join(%r, os.environ['FNN_PROCESS_ID']), 'w')"
            ".write(os.environ['FNN_NUM_PROCESSES'] + ' ' + os.environ['FNN_COORDINATOR'])"
            % str(tmp_path))
    assert launch_local([sys.executable, "-c", code], 3, timeout=60) == [0, 0, 0]
    got = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(got) == ["0", "1", "2"] and len(set(got.values())) == 1
    assert re.fullmatch(r"3 localhost:\d+", got["0"])
    # a failing process stops the others (a race-free case: process 1 would sleep a minute)
    stop = ("import os, sys, time; "
            "sys.exit(3) if os.environ['FNN_PROCESS_ID'] == '0' else time.sleep(60)")
    assert launch_local([sys.executable, "-c", stop], 2, timeout=60) == [3, -9]


def test_default_mesh_context():
    assert sharding.current_mesh() is None
    mesh = jax.make_mesh((1,), ("data",))                      # Explicit: stored as Auto
    with sharding.default_mesh(mesh):
        got = sharding.current_mesh()
        assert got.axis_types == (jax.sharding.AxisType.Auto,) and got.axis_names == ("data",)
        with sharding.default_mesh(None):
            assert sharding.current_mesh() is None
        assert sharding.current_mesh() is got
    assert sharding.current_mesh() is None
