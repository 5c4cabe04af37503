"""fnn.sharding: rules, presets, placement, shuffles, the sharded step and sharded checkpoints.

The multi-device checks run in subprocesses (the device count is fixed when JAX starts):
``sharding_workers/train_equivalence.py`` on 8 simulated CPU devices (one process: every
model, mesh and gradient path at once, so start-up and compilation are paid once), and
``sharding_workers/two_processes.py`` as two processes × 2 devices against one × 4. The rest
runs here on the suite's single device.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fnn import sharding
from fnn.models import GPT
from fnn.sharding import checkpoint as sckpt

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
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)   # XLA's defaults (not the suite's fast-compile flags): the
    return env                   # 1e-5 equivalence bar is for the code users run


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
    """20 Adam steps (float32) on (8,) data, (4, 2) data×model and FSDP meshes give the
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

def _mesh(shape=(1, 1), names=("data", "model")):
    return sharding.make_mesh(shape, names)


def _gpt_params():
    return GPT(96, 32, 4, 2, 64, 16).init(jax.random.PRNGKey(0), (2, 16))[0]


def test_tensor_parallel_preset_column_in_row_out_copy_axis_whole():
    specs = dict(zip(sharding.param_paths(_gpt_params()), jax.tree.leaves(
        sharding.param_specs(_gpt_params(), _mesh(), sharding.tensor_parallel()),
        is_leaf=lambda s: isinstance(s, P))))
    m = "model"
    for n in "qkv":                                   # stacked: (copies, in, out)
        assert specs[f"blocks/attn/mha/{n}/w"] == P(None, None, m)
        assert specs[f"blocks/attn/mha/{n}/b"] == P(None, m)
    assert specs["blocks/attn/mha/o/w"] == P(None, m)            # (copies, in, out): in
    assert specs["blocks/attn/mha/o/b"] == P()
    assert specs["blocks/mlp/mlp/fc1/w"] == P(None, None, m)
    assert specs["blocks/mlp/mlp/fc2/w"] == P(None, m)
    assert specs["blocks/mlp/mlp/fc2/b"] == P()
    assert specs["embed/w"] == P(m)                              # (vocab, d): vocab
    assert specs["blocks/attn/norm/scale"] == P()


def test_fsdp_preset_splits_largest_axis_of_large_params():
    params = {"big": jnp.zeros((8, 32)), "small": jnp.zeros((4,)), "odd": jnp.zeros((3, 5, 7))}
    got = sharding.param_specs(params, _mesh((1,), ("data",)), sharding.fsdp(min_size=16))
    assert got == {"big": P(None, "data"), "small": P(), "odd": P(None, None, "data")}


def test_user_rules_first_match_wins_and_unmatched_replicated():
    params = {"a": {"w": jnp.zeros((4, 4))}, "b": {"w": jnp.zeros((4, 4))}}
    rules = [(r"^a/", P("model")), (r"w$", P(None, "data"))]
    got = sharding.param_specs(params, _mesh(), rules)
    assert got == {"a": {"w": P("model")}, "b": {"w": P(None, "data")}}
    rules2 = [(r"^a/", P("model"))]
    assert sharding.param_specs(params, _mesh(), rules2)["b"]["w"] == P()


def test_rule_naming_a_missing_parameter():
    with pytest.raises(ValueError, match=r"shard_params: rule 'decoder/w\$' matches no "
                                         r"parameter; the parameters are: a/w"):
        sharding.shard_params({"a": {"w": jnp.zeros((2, 2))}}, _mesh(),
                              [(r"decoder/w$", P("model"))])


def test_mesh_without_the_named_axis():
    mesh = _mesh((1,), ("data",))
    with pytest.raises(ValueError, match=r"tensor_parallel: mesh axis 'model' not in the "
                                         r"mesh, whose axes are \('data',\)"):
        sharding.shard_params(_gpt_params(), mesh, sharding.tensor_parallel())
    with pytest.raises(ValueError, match=r"spec P\('model',\) for parameter 'w': "
                                         r"mesh axis 'model' not in the mesh"):
        sharding.shard_params({"w": jnp.zeros(2)}, mesh, [("w", P("model"))])
    with pytest.raises(ValueError, match=r"batch_sharding: mesh axis 'batch' not in the mesh"):
        sharding.shard_batch(jnp.zeros((2, 3)), mesh, axis="batch")


def test_spec_longer_than_parameter():
    with pytest.raises(ValueError, match=r"spec P\('data', None\) for parameter 'w' has 2 "
                                         r"entries, the parameter only 1 axes"):
        sharding.param_specs({"w": jnp.zeros(2)}, _mesh(), [("w", P("data", None))])


def test_explicit_mesh_is_used_with_auto_axes():
    explicit = jax.make_mesh((1,), ("data",))
    assert explicit.axis_types == (jax.sharding.AxisType.Explicit,)
    auto = sharding.as_auto(explicit)
    assert auto.axis_types == (jax.sharding.AxisType.Auto,)
    assert auto.axis_names == explicit.axis_names and auto.devices.tolist() == \
        explicit.devices.tolist()
    manual = Mesh(explicit.devices, ("data",), axis_types=(jax.sharding.AxisType.Manual,))
    with pytest.raises(ValueError, match=r"include Manual ones .* axis_types="
                                         r"\(jax.sharding.AxisType.Auto,\)"):
        sharding.as_auto(manual)
    with pytest.raises(ValueError, match=r"make_mesh: a mesh of shape \(2, 4\) needs 8 "
                                         r"devices, there are 1"):
        sharding.make_mesh((2, 4), ("data", "model"))


def test_simulate_cpu_devices_after_start():
    jnp.zeros(1).block_until_ready()
    sharding.simulate_cpu_devices(jax.device_count())          # already so: fine
    with pytest.raises(RuntimeError, match=r"simulate_cpu_devices\(3\): JAX has already "
                                           r"started with 1 device"):
        sharding.simulate_cpu_devices(3)
    with pytest.raises(ValueError, match=r"n must be a positive int, got 0"):
        sharding.simulate_cpu_devices(0)


def test_shard_train_state_and_process_local_batch_on_one_process():
    from fnn import optim
    from fnn.train import TrainState
    mesh = _mesh()
    params = {"w": jnp.ones((4, 2))}
    opt = optim.adam(1e-3)
    ts = TrainState(params, {}, opt.init(params), jnp.zeros((), jnp.int32),
                    jax.random.PRNGKey(0))
    placed, sh = sharding.shard_train_state(ts, mesh, [("w", P(None, "model"))])
    assert placed.params["w"].sharding == sh.params["w"]
    assert placed.opt_state[0].mu["w"].sharding.spec == P(None, "model")
    assert placed.step.sharding.spec == P()
    x = np.arange(6.0).reshape(3, 2)
    got = sharding.process_local_batch(x, mesh)
    assert got.shape == (3, 2) and got.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(got), x)


def test_opt_state_takes_its_params_shardings():
    from fnn import optim
    mesh = _mesh()
    params = sharding.shard_params({"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}, mesh,
                                   [("w", P(None, "model"))])
    opt_state = sharding.shard_opt_state(optim.adam(1e-3), params, mesh)
    assert opt_state[0].mu["w"].sharding.spec == P(None, "model")
    assert opt_state[0].nu["w"].sharding.spec == P(None, "model")
    assert opt_state[0].count.sharding.spec == P()


def test_sharding_table_shows_each_parameter():
    mesh = _mesh()
    params = sharding.shard_params({"dense": {"w": jnp.zeros((4, 6), jnp.float32)}}, mesh,
                                   [("w", P(None, "model"))])
    text = sharding.sharding_table(params)
    assert re.search(r"dense/w\s+\(4, 6\)\s+float32\s+P\(None, 'model'\)\s+"
                     r"\(4, 6\)\s+96", text)
    assert "bytes per device 96" in text and repr(text) == str(text)


def test_shard_shuffle_permutes_within_shards(rng):
    """Each device's batches hold a permutation of that device's own rows, in NumPy terms."""
    n, d, b = 24, 4, 8
    x = np.arange(n)
    head, rest = sharding.shard_shuffle(jax.random.PRNGKey(3), x, d, b)
    assert head.shape == (d, n // b, b // d) and rest.shape == (0,)
    per = n // d
    for j in range(d):
        assert sorted(np.asarray(head[j]).ravel()) == list(range(j * per, (j + 1) * per))
    batch = np.asarray(sharding.take_batch(head, 1))
    np.testing.assert_array_equal(batch, np.asarray(head)[:, 1].ravel())
    head0, rest0 = sharding.shard_shuffle(None, np.arange(10), 2, 4)
    np.testing.assert_array_equal(np.asarray(sharding.take_batch(head0, 0)), [0, 1, 5, 6])
    np.testing.assert_array_equal(np.asarray(rest0), [4, 9])


@pytest.mark.parametrize("n, d, b", [(24, 4, 8), (28, 4, 8), (12, 2, 6), (16, 1, 5)])
def test_interleaved_placement_reads_batches_in_sequence(n, d, b):
    """Unshuffled, the sharded layout gives exactly the plain epoch's batches: data[i·B:(i+1)·B]
    and then the partial batch data[full·B:]."""
    if n % d or b % d:
        pytest.skip("layout needs multiples")
    x = np.arange(n) * 10
    head, rest = sharding.shard_shuffle(None, x[sharding.interleave_order(n, d, b)], d, b)
    for i in range(n // b):
        np.testing.assert_array_equal(np.asarray(sharding.take_batch(head, i)),
                                      x[i * b:(i + 1) * b])
    np.testing.assert_array_equal(np.asarray(rest), x[(n // b) * b:])
    with pytest.raises(ValueError, match=r"interleave_order: 10 examples and batch size 4 "
                                         r"must both be multiples of the 4 data shards"):
        sharding.interleave_order(10, 4, 4)


def test_sharded_step_equals_plain_step_and_donates(rng):
    from fnn import losses, optim
    from fnn.layers import Dense
    model, opt = Dense(3), optim.sgd(0.1)
    params = model.init(jax.random.PRNGKey(0), (4, 2))[0]
    x, t = jnp.asarray(rng.normal(size=(4, 2))), jnp.asarray(rng.normal(size=(4, 3)))

    def step(s, batch):
        g = jax.grad(lambda p: losses.mse(model.apply(p, {}, batch[0])[0], batch[1]))(s[0])
        upd, o = opt.update(g, s[1], s[0])
        return (jax.tree.map(jnp.add, s[0], upd), o), jnp.sum(g["w"])
    mesh = _mesh((1,), ("data",))
    s0 = (params, opt.init(params))
    sh = jax.tree.map(lambda _: sharding.replicated(mesh), s0)
    ref = jax.jit(step)(s0, (x, t))
    start = jax.device_put(jax.tree.map(jnp.copy, s0), sh)
    got = sharding.make_sharded_step(step, mesh, sh)(start, sharding.shard_batch((x, t), mesh))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.leaves(start)[0].is_deleted()        # the old state's buffers were donated
    kept = jax.device_put(jax.tree.map(jnp.copy, s0), sh)
    sharding.make_sharded_step(step, mesh, sh, donate=False)(kept, (x, t))
    assert not any(a.is_deleted() for a in jax.tree.leaves(kept))


# --------------------------------------------------------------------------- checkpoints

def _state():
    r = np.random.default_rng(0)
    return {"w": jnp.asarray(r.normal(size=(4, 3))), "step": jnp.int32(7),
            "key": jax.random.key(5), "h": jnp.asarray(r.normal(size=(2,)), jnp.bfloat16)}


def test_checkpoint_round_trip_bit_exact(tmp_path):
    t = _state()
    sckpt.save(tmp_path / "c", t)
    back = sckpt.restore(tmp_path / "c", t)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(t)):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("stage", ["shard file", "commit"])
def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, stage):
    """A save that dies while writing its shards, or just before its commit record, leaves
    the previous checkpoint loadable, bit for bit; the next good save cleans up."""
    from fnn import checkpoint as ckpt
    good = _state()
    sckpt.save(tmp_path / "c", good)
    newer = dict(good, w=good["w"] + 1)

    def die(*a, **k):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(ckpt, "save" if stage == "shard file" else "_atomic_write", die)
    with pytest.raises(KeyboardInterrupt):
        sckpt.save(tmp_path / "c", newer)
    monkeypatch.undo()
    assert len([v for v in os.listdir(tmp_path / "c") if v.startswith("v-")]) == 2
    np.testing.assert_array_equal(np.asarray(sckpt.restore(tmp_path / "c", good)["w"]),
                                  np.asarray(good["w"]))
    sckpt.save(tmp_path / "c", newer)
    assert len([v for v in os.listdir(tmp_path / "c") if v.startswith("v-")]) == 1
    np.testing.assert_array_equal(np.asarray(sckpt.restore(tmp_path / "c", good)["w"]),
                                  np.asarray(newer["w"]))


def test_checkpoint_mismatch_and_corruption(tmp_path):
    t = _state()
    sckpt.save(tmp_path / "c", t)
    with pytest.raises(sckpt.CheckpointMismatchError, match=r"'w': float64\(4, 3\) in the "
                                                            r"checkpoint, float64\(4, 4\)"):
        sckpt.restore(tmp_path / "c", dict(t, w=jnp.zeros((4, 4))))
    with pytest.raises(sckpt.CheckpointError, match=r"no sharded checkpoint here"):
        sckpt.restore(tmp_path / "nothing", t)
    (tmp_path / "c" / "checkpoint.json").write_text('{"format": "fnn-sharded-checkpoint/1"}')
    with pytest.raises(sckpt.CheckpointError, match=r"corrupt checkpoint record"):
        sckpt.restore(tmp_path / "c", t)


def test_checkpoint_piece_outside_its_array_is_refused(tmp_path):
    """A hostile shard file whose piece claims bounds outside the array is an error."""
    from fnn import checkpoint as ckpt
    t = {"w": jnp.zeros((2, 2))}
    sckpt.save(tmp_path / "c", t)
    rec = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    file = tmp_path / "c" / rec["version"] / "shards-00000.safetensors"
    ckpt.save(file, {"a0": np.zeros((2, 2))}, metadata={"pieces": "[[0, [[0, 2], [1, 3]]]]"})
    with pytest.raises(sckpt.CheckpointError, match=r"corrupt shard file: piece bounds"):
        sckpt.restore(tmp_path / "c", t)


def test_opt_state_leaves_unlike_params_stay_replicated():
    """A single-array params tree: the scalar step count is not mistaken for a moment, and a
    factored moment of another shape is replicated."""
    mesh = _mesh()
    w = sharding.shard_params(jnp.zeros((4, 4)), mesh, [("", P(None, "model"))])
    state = {"count": jnp.zeros((), jnp.int32), "mu": jnp.zeros((4, 4)), "row": jnp.zeros((4,))}
    got = sharding.opt_state_shardings(state, w, mesh)
    assert got["mu"].spec == P(None, "model")
    assert got["count"].spec == P() and got["row"].spec == P()


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
    assert launch_local([sys.executable, "-c", "import sys; sys.exit(3)"], 2,
                        timeout=60) == [3, 3]


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
