"""``WeightNorm`` from and to PyTorch's ``weight_norm(..., dim=0)``: the names of both PyTorch
APIs, outputs equal to a float64 NumPy implementation of PyTorch's formula
(``weight = g · v / ‖v‖``, the norm over every axis but 0), a bit-exact round trip, and the
layers PyTorch cannot normalise this way refused by name. With torch installed, the same
against ``torch.nn.utils.parametrizations.weight_norm`` itself."""
import jax
import numpy as np
import pytest

from fnn.layers import Conv, ConvTranspose, Dense, WeightNorm, serial
from fnn.torch_weights import StateDictError, load_state_dict, state_dict

P = "parametrizations.weight."


def torch_weight(g, v):
    """PyTorch's ``_weight_norm(v, g, dim=0)`` in float64 NumPy."""
    return g * v / np.sqrt(np.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))


def test_dense_loads_both_pytorch_names_and_computes_pytorchs_weight(rng):
    g, v, b = rng.standard_normal((3, 1)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    x = rng.standard_normal((2, 4))
    want = x @ torch_weight(g, v).T + b                     # nn.Linear with that weight
    model = WeightNorm(Dense(3))
    for sd, layout in (({P + "original0": g, P + "original1": v, "bias": b}, None),
                       ({"weight_g": g, "weight_v": v, "bias": b}, {"": "weight_g"})):
        params, state = load_state_dict(model, sd, (2, 4), layout=layout)
        assert params["v"].shape == (4, 3) and params["g"].shape == (3,)
        np.testing.assert_allclose(model.apply(params, state, x)[0], want, rtol=1e-12)
        back = state_dict(model, params, state, (2, 4), layout=layout)
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])


def test_conv_in_a_model_round_trips_and_matches_pytorchs_weight(rng):
    model = serial(WeightNorm(Conv(5, (3, 3), padding=1)), Dense(2))
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, 6, 6, 2))
    sd = state_dict(model, params, state, (1, 6, 6, 2))
    assert {"0." + P + "original0", "0." + P + "original1", "0.bias"} <= set(sd)
    assert sd["0." + P + "original0"].shape == (5, 1, 1, 1)
    assert sd["0." + P + "original1"].shape == (5, 2, 3, 3)          # nn.Conv2d's OIHW
    w = torch_weight(sd["0." + P + "original0"], sd["0." + P + "original1"])
    from fnn.layers.weight_norm import weight_norm
    np.testing.assert_allclose(np.asarray(weight_norm(params["0"]["v"], params["0"]["g"])),
                               w.transpose(2, 3, 1, 0), rtol=1e-12)
    loaded, _ = load_state_dict(model, sd, (1, 6, 6, 2))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_layers_pytorch_does_not_normalise_on_their_output_axis_are_refused(rng):
    with pytest.raises(StateDictError, match=r"WeightNorm.*ConvTranspose"):
        load_state_dict(WeightNorm(ConvTranspose(3, (2, 2))), {}, (1, 4, 4, 2))
    with pytest.raises(StateDictError, match=r"laid out 'conv1d'"):
        load_state_dict(WeightNorm(Dense(3)), {}, (1, 4), layout={"layer": "conv1d"})
    with pytest.raises(StateDictError, match=r"WeightNorm layout is one of"):
        load_state_dict(WeightNorm(Dense(3)), {}, (1, 4), layout={"": "weight"})
    with pytest.raises(StateDictError, match=r"'parametrizations.weight.original0' is \(3,\), .* needs \(3, 1\)"):
        load_state_dict(WeightNorm(Dense(3)), {P + "original0": np.ones(3),
                                               P + "original1": np.ones((3, 4)),
                                               "bias": np.zeros(3)}, (1, 4))


def test_against_torch_weight_norm(rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.parametrizations import weight_norm as torch_wn
    lin = torch_wn(torch.nn.Linear(4, 3).double(), dim=0)
    with torch.no_grad():
        lin.parametrizations.weight.original0.mul_(1.7)           # g no longer ‖v‖
    x = rng.standard_normal((2, 4))
    params, state = load_state_dict(WeightNorm(Dense(3)), lin.state_dict(), (2, 4))
    want = lin(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(WeightNorm(Dense(3)).apply(params, state, x)[0], want,
                               rtol=1e-12)
