"""fnn.sharding.mesh in-process: the meshes make_mesh builds (from given devices too), as_auto,
axis_size and the argument checks. A mesh of two axes of size two is built from the one CPU
device repeated; nothing is placed on it."""
import jax
import pytest
from jax.sharding import AxisType, Mesh

from fnn import sharding


def test_make_mesh_from_given_devices_has_auto_axes():
    d = jax.devices()[0]
    mesh = sharding.make_mesh((2, 1), ("data", "model"), devices=[d, d])
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 2, "model": 1}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert mesh.devices.tolist() == [[d], [d]]
    assert sharding.make_mesh((1,)).axis_types == (AxisType.Auto,)
    assert sharding.as_auto(mesh) is mesh                  # already Auto: itself


def test_make_mesh_refusals_name_what_came():
    with pytest.raises(ValueError, match=r"^make_mesh: 2 axis sizes \(1, 1\) for 1 names "
                                         r"\('data',\)$"):
        sharding.make_mesh((1, 1), ("data",))
    with pytest.raises(ValueError, match=r"^make_mesh: a mesh of shape \(1,\) needs 1 devices, "
                                         r"there are 0 "):
        sharding.make_mesh((1,), devices=[])


def test_as_auto_refuses_what_is_not_a_mesh():
    with pytest.raises(TypeError, match=r"^fnn.sharding: expected a jax.sharding.Mesh, got "
                                        r"str$"):
        sharding.as_auto("data")
    explicit = jax.make_mesh((1,), ("data",))
    auto = sharding.as_auto(explicit)
    assert isinstance(auto, Mesh) and auto.axis_types == (AxisType.Auto,)


def test_axis_size_of_a_name_and_of_a_tuple_of_names():
    d = jax.devices()[0]
    mesh = sharding.make_mesh((2, 3), ("data", "model"), devices=[d] * 6)
    assert sharding.axis_size(mesh, "data") == 2 and sharding.axis_size(mesh, "model") == 3
    assert sharding.axis_size(mesh, ("data", "model")) == 6
    assert sharding.axis_size(mesh, ("model",)) == 3 and sharding.axis_size(mesh, ()) == 1


@pytest.mark.parametrize("n", [True, 1.0, -1, "2"])
def test_simulate_cpu_devices_takes_only_a_positive_int(n):
    with pytest.raises(ValueError, match=r"^simulate_cpu_devices: n must be a positive int, "
                                         r"got " + repr(n).replace(".", r"\.") + "$"):
        sharding.simulate_cpu_devices(n)
