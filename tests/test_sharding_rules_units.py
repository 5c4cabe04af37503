"""fnn.sharding.rules on shapes alone: paths, specs, the presets and the optimizer state's
shardings, on meshes whose axes are larger than one. Such a mesh is built from the one CPU
device repeated (``_fake_mesh``): enough for every rule, spec and check here, none of which
places an array (the multi-device placement is tested in subprocesses in test_sharding.py)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fnn import sharding
from fnn.sharding import rules as R


def _fake_mesh(shape, names):
    devices = np.array([jax.devices()[0]] * int(np.prod(shape)), dtype=object).reshape(shape)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def _specs(params, mesh, rules):
    return sharding.param_specs(params, mesh, rules)


def test_param_paths_of_dicts_lists_and_named_tuples():
    Pair = collections.namedtuple("Pair", "first second")
    params = {"layers": [{"w": 1.0}, {"w": 2.0}], "pair": Pair(3.0, 4.0)}
    assert sharding.param_paths(params) == ["layers/0/w", "layers/1/w", "pair/first",
                                            "pair/second"]
    assert R._key("plain") == "plain"                # a key of no known kind: its str


def test_no_rules_replicates_everything():
    mesh = _fake_mesh((2, 2), ("data", "model"))
    params = {"a": jnp.zeros((4, 4)), "b": [jnp.zeros(3), jnp.zeros(())]}
    assert _specs(params, mesh, None) == {"a": P(), "b": [P(), P()]}
    sh = sharding.param_shardings(params, mesh)
    assert all(isinstance(s, NamedSharding) and s.spec == P() for s in jax.tree.leaves(sh))
    assert jax.tree.structure(sh) == jax.tree.structure(params)


def test_a_tuple_entry_splits_over_the_product_of_its_axes():
    mesh = _fake_mesh((2, 3), ("data", "model"))
    spec = P(("data", "model"), None)
    assert _specs({"w": jnp.zeros((12, 5))}, mesh, [("w", spec)]) == {"w": spec}
    with pytest.raises(ValueError, match=r"^shard_params: parameter 'w' of shape \(8, 5\) "
                                         r"cannot be split as P\(\('data', 'model'\), None\): "
                                         r"axis of size 8 over mesh axis \('data', 'model'\) "
                                         r"of size 6$"):
        _specs({"w": jnp.zeros((8, 5))}, mesh, [("w", spec)])


def test_a_split_that_does_not_divide_is_refused_naming_the_sizes():
    mesh = _fake_mesh((2, 1), ("data", "model"))
    with pytest.raises(ValueError, match=r"^shard_params: parameter 'a/w' of shape \(3, 4\) "
                                         r"cannot be split as P\('data',\): axis of size 3 "
                                         r"over mesh axis 'data' of size 2$"):
        _specs({"a": {"w": jnp.zeros((3, 4))}}, mesh, [("w", P("data"))])
    with pytest.raises(ValueError, match=r"^shard_params: spec P\('data', None\) for parameter "
                                         r"'w' has 2 entries, the parameter only 1 axes "
                                         r"\(shape \(4,\)\)$"):
        _specs({"w": jnp.zeros(4)}, mesh, [("w", P("data", None))])
    with pytest.raises(ValueError, match=r"^fit: spec P\('x',\) for parameter 'w': mesh axis "):
        sharding.param_specs({"w": jnp.zeros(4)}, mesh, [("w", P("x"))], where="fit")


def test_rules_that_are_not_pairs_of_regex_and_spec():
    mesh = _fake_mesh((1,), ("data",))
    with pytest.raises(TypeError, match=r"^shard_params: rules must be a list of \(regex, "
                                        r"PartitionSpec\) pairs or a callable \(path, shape, "
                                        r"mesh\) -> PartitionSpec, got \[3\]$"):
        _specs({"w": jnp.zeros(2)}, mesh, [3])
    with pytest.raises(TypeError, match=r"^shard_params: rule 'w' maps to \('data',\), not a "
                                        r"PartitionSpec$"):
        _specs({"w": jnp.zeros(2)}, mesh, [("w", ("data",))])


@pytest.mark.parametrize("n", [12, 13])
def test_a_rule_matching_nothing_lists_at_most_twelve_parameters(n):
    mesh = _fake_mesh((1,), ("data",))
    params = {f"p{i:02d}": jnp.zeros(2) for i in range(n)}
    shown = ", ".join(f"p{i:02d}" for i in range(12)) + (", ..." if n > 12 else "")
    with pytest.raises(ValueError) as e:
        _specs(params, mesh, [("nothing", P())])
    assert str(e.value) == (f"shard_params: rule 'nothing' matches no parameter; the "
                            f"parameters are: {shown}")


def test_fsdp_on_a_mesh_axis_of_two():
    mesh = _fake_mesh((2, 1), ("data", "model"))
    rule = sharding.fsdp("data", min_size=16)
    assert rule("w", (4, 4), mesh) == P(None, "data")      # exactly min_size: split
    assert rule("w", (3, 5), mesh) is None                  # 15 < 16: replicated
    assert rule("w", (6, 5), mesh) == P("data")             # the only axis 2 divides
    assert rule("w", (5, 7), mesh) is None                  # none divides: replicated
    assert rule("w", (), mesh) is None                      # a scalar
    assert rule("w", (8, 6, 4), mesh) == P("data")
    with pytest.raises(ValueError, match=r"^fsdp: mesh axis 'batch' not in the mesh"):
        sharding.fsdp("batch")("w", (4, 4), mesh)


def test_tensor_parallel_unstacked_layers():
    mesh = _fake_mesh((1, 2), ("data", "model"))
    rule = sharding.tensor_parallel()
    cases = {"attn/o/w": ((8, 6), P("model")),              # row-parallel: input axis
             "mlp/fc2/w": ((6, 4), P("model")),
             "mlp/fc2/b": ((4,), None),
             "embed/w": ((10, 3), P("model")),              # the vocabulary
             "dense/w": ((3, 4), P(None, "model")),         # output axis
             "dense/b": ((4,), P("model")),
             "w": ((3, 4), P(None, "model")),
             "b": ((4,), P("model")),
             "norm/scale": ((4,), None),
             "rnn/wi": ((4, 4), None),
             "dense/w1": ((4, 4), None)}
    for path, (shape, want) in cases.items():
        assert rule(path, shape, mesh) == want, path


def test_tensor_parallel_leaves_an_axis_it_does_not_divide_whole():
    mesh = _fake_mesh((1, 2), ("data", "model"))
    rule = sharding.tensor_parallel()
    assert rule("dense/w", (4, 3), mesh) is None
    assert rule("dense/b", (3,), mesh) is None
    assert rule("o/w", (3, 4), mesh) is None
    assert rule("embed/w", (9, 4), mesh) is None
    assert rule("blocks/embed/w", (2, 8, 3), mesh) == P(None, "model")
    assert rule("w", (), mesh) is None and rule("b", (), mesh) is None
    with pytest.raises(ValueError, match=r"^tensor_parallel: mesh axis 'model' not in"):
        rule("w", (2, 2), _fake_mesh((2,), ("data",)))


def test_opt_state_checks_shape_and_rank_against_its_params():
    """A subtree shaped like the params takes their shardings only with the params' shapes
    (arrays given) or a rank the spec fits (shardings given); other leaves are replicated."""
    mesh = _fake_mesh((1, 2), ("data", "model"))
    given = NamedSharding(mesh, P(None, "model"))
    state = {"mu": jax.ShapeDtypeStruct((4, 4), jnp.float32),
             "row": jax.ShapeDtypeStruct((4,), jnp.float32)}
    got = sharding.opt_state_shardings(state, given, mesh)
    assert got["mu"] == given and got["row"].spec == P()
    one = sharding.make_mesh((1, 1), ("data", "model"))
    w = sharding.shard_params(jnp.zeros((4, 4)), one, [("", P(None, "model"))])
    state = {"mu": jnp.zeros((4, 4)), "half": jnp.zeros((4, 2))}
    got = sharding.opt_state_shardings(state, w, one)
    assert got["mu"].spec == P(None, "model") and got["half"].spec == P()
