"""Add and Multiply: values and hand backward against float64 NumPy from the formulas; the
ResNet projection shortcut ``relu(F(x) + downsample(x))`` and the SwiGLU product written with
public layers, against NumPy references of their equations and jax.vjp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.activations import swish
from fnn.layers import (Add, BatchNorm, Conv, Dense, GatedMLP, Multiply, Relu, Swish, parallel,
                        serial)

from helpers import check_pair, tree_rel_err


def arrays(rng, n, shape):
    return tuple(jnp.asarray(rng.standard_normal(shape)) for _ in range(n))


@pytest.mark.parametrize("n", [2, 3])
def test_add_and_multiply_match_numpy(n, rng, key):
    xs, dy = arrays(rng, n, (3, 4, 5)), jnp.asarray(rng.standard_normal((3, 4, 5)))
    xs_np = [np.asarray(x) for x in xs]
    for layer, ref, dref in (
            (Add(), sum(xs_np), [np.asarray(dy)] * n),
            (Multiply(), np.prod(xs_np, axis=0),
             [np.asarray(dy) * np.prod([x for j, x in enumerate(xs_np) if j != i], axis=0)
              for i in range(n)])):
        params, state, out = layer.init(key, tuple(x.shape for x in xs))
        assert params == {} and out == (3, 4, 5)
        y, _ = layer.apply(params, state, xs)
        np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-14)
        _, dxs = layer.backward(params, state, xs, dy)
        assert isinstance(dxs, tuple) and len(dxs) == n
        for a, b in zip(dxs, dref):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_multiply_gradient_with_a_zero_input(key):
    xs = (jnp.array([0.0, 2.0]), jnp.array([3.0, 0.0]), jnp.array([5.0, 7.0]))
    _, dxs = Multiply().backward({}, {}, xs, jnp.ones(2))
    np.testing.assert_array_equal(np.stack(dxs), [[15.0, 0.0], [0.0, 14.0], [0.0, 0.0]])


def test_merge_errors(key):
    with pytest.raises(ValueError, match=r"Add: the inputs must have one shape, got \[\(2, 3\), \(2, 4\)\]"):
        Add().init(key, ((2, 3), (2, 4)))
    with pytest.raises(ValueError, match="Multiply: expected a tuple of two or more input shapes"):
        Multiply().init(key, (2, 3))
    with pytest.raises(ValueError, match="Add: expected a tuple of two or more arrays"):
        Add().apply({}, {}, jnp.ones((2, 3)))


# --------------------------------------------------------------------------- ResNet shortcut

def np_conv(x, w, stride, pad):
    """NHWC convolution with HWIO kernel, explicit symmetric zero padding, from the definition."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
            y[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
    return y


def np_bn(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["offset"]


def randomize(tree, rng, positive=False):
    return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape) if positive
                                              else rng.normal(0, 0.5, a.shape)), tree)


def test_resnet_projection_shortcut(rng, key, monkeypatch):
    """torchvision's BasicBlock with a downsample: relu(bn2(conv2(relu(bn1(conv1 x)))) +
    bn(conv1x1(x))), stride 2, channels 3 -> 4."""
    main = serial(("conv1", Conv(4, (3, 3), 2, 1, use_bias=False)), ("bn1", BatchNorm()),
                  ("relu", Relu()), ("conv2", Conv(4, (3, 3), 1, 1, use_bias=False)),
                  ("bn2", BatchNorm()))
    down = serial(("0", Conv(4, (1, 1), 2, 0, use_bias=False)), ("1", BatchNorm()))
    block = serial(("branches", parallel(("main", main), ("downsample", down))), ("add", Add()),
                   ("relu", Relu()))
    params, state, out = block.init(key, (2, 6, 6, 3))
    assert out == (2, 3, 3, 4)
    params, state = randomize(params, rng), randomize(state, rng, positive=True)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)))
    y, _ = block.apply(params, state, x)

    P = jax.tree.map(np.asarray, params["branches"])
    S = jax.tree.map(np.asarray, state["branches"])
    pm, sm, pd, sd = P["main"], S["main"], P["downsample"], S["downsample"]
    h = np.maximum(np_bn(np_conv(np.asarray(x), pm["conv1"]["w"], 2, 1), pm["bn1"], sm["bn1"]), 0)
    f = np_bn(np_conv(h, pm["conv2"]["w"], 1, 1), pm["bn2"], sm["bn2"])
    shortcut = np_bn(np_conv(np.asarray(x), pd["0"]["w"], 2, 0), pd["1"], sd["1"])
    np.testing.assert_allclose(y, np.maximum(f + shortcut, 0), rtol=1e-12, atol=1e-12)

    dy = jnp.asarray(rng.standard_normal(out))
    check_pair(block, params, state, x, dy, monkeypatch)                     # eval: running stats
    check_pair(block, params, state, x, dy, monkeypatch, train=True)         # train: batch stats


# --------------------------------------------------------------------------- SwiGLU

def test_swiglu_from_public_layers_equals_numpy_and_gated_mlp(rng, key, monkeypatch):
    h, d = 6, 5
    composed = serial(("ff", parallel(("gate", serial(Dense(h, use_bias=False), Swish())),
                                      ("up", Dense(h, use_bias=False)))),
                      ("mul", Multiply()), ("down", Dense(d, use_bias=False)))
    fused = GatedMLP(h)
    params, state, out = fused.init(key, (2, 3, d))
    params = randomize(params, rng)
    as_composed = {"ff": {"gate": {"0": {"w": params["gate"]["w"]}, "1": {}},
                          "up": {"w": params["up"]["w"]}}, "mul": {}, "down": params["down"]}
    x, dy = jnp.asarray(rng.standard_normal((2, 3, d))), jnp.asarray(rng.standard_normal(out))

    xn, P = np.asarray(x), jax.tree.map(np.asarray, params)
    g = xn @ P["gate"]["w"]
    ref = (g / (1 + np.exp(-g)) * (xn @ P["up"]["w"])) @ P["down"]["w"]       # (silu(xW_g) ⊙ xW_u) W_d
    y_c, _ = composed.apply(as_composed, {"ff": {"gate": {"0": {}, "1": {}}, "up": {}},
                                          "mul": {}, "down": {}}, x)
    y_f, _ = fused.apply(params, state, x)
    np.testing.assert_allclose(y_c, ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(y_f, ref, rtol=1e-12, atol=1e-13)

    comp_state = composed.init(key, (2, 3, d))[1]
    check_pair(composed, as_composed, comp_state, x, dy, monkeypatch)
    dp_c, dx_c = composed.backward(as_composed, comp_state, x, dy)
    dp_f, dx_f = fused.backward(params, state, x, dy)
    got = {"gate": dp_c["ff"]["gate"]["0"], "up": dp_c["ff"]["up"], "down": dp_c["down"]}
    assert tree_rel_err(got, dp_f) < 1e-12 and tree_rel_err(dx_c, dx_f) < 1e-12
    assert fused == GatedMLP(h, activation=swish)
