"""fnn.sharding on the suite's one device: meshes, parameter rules and presets, the placement of
parameters, optimizer state and train states, and the sharding table."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fnn import sharding
from fnn.models import GPT


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


def test_fsdp_preset_takes_the_later_axis_on_a_tie():
    """Two (or three) equally large axes that the mesh axis divides: the later one is split, as
    fsdp's docstring says; a larger earlier axis still wins over a later smaller one."""
    params = {"square": jnp.zeros((32, 32)), "first_two": jnp.zeros((16, 16, 4)),
              "three": jnp.zeros((8, 8, 8)), "larger_first": jnp.zeros((64, 32, 32))}
    mesh = _mesh((1,), ("data",))
    got = sharding.param_specs(params, mesh, sharding.fsdp(min_size=16))
    assert got == {"square": P(None, "data"), "first_two": P(None, "data"),
                   "three": P(None, None, "data"), "larger_first": P("data")}
    rule = sharding.fsdp("data", min_size=16)           # the rule itself, shape by shape
    assert rule("w", (4, 6, 6), mesh) == P(None, None, "data")


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


def test_opt_state_leaves_unlike_params_stay_replicated():
    """A single-array params tree: the scalar step count is not mistaken for a moment, and a
    factored moment of another shape is replicated."""
    mesh = _mesh()
    w = sharding.shard_params(jnp.zeros((4, 4)), mesh, [("", P(None, "model"))])
    state = {"count": jnp.zeros((), jnp.int32), "mu": jnp.zeros((4, 4)), "row": jnp.zeros((4,))}
    got = sharding.opt_state_shardings(state, w, mesh)
    assert got["mu"].spec == P(None, "model")
    assert got["count"].spec == P() and got["row"].spec == P()


def test_sharding_table_shows_each_parameter():
    mesh = _mesh()
    params = sharding.shard_params({"dense": {"w": jnp.zeros((4, 6), jnp.float32)}}, mesh,
                                   [("w", P(None, "model"))])
    text = sharding.sharding_table(params)
    assert re.search(r"dense/w\s+\(4, 6\)\s+float32\s+P\(None, 'model'\)\s+"
                     r"\(4, 6\)\s+96", text)
    assert "bytes per device 96" in text and repr(text) == str(text)
