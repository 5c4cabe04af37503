"""Normalization layers against float64 NumPy references written from the equations, and their
hand-derived backward against jax.vjp with non-trivial params and running statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.combinators import residual, serial, stack
from fnn.layers import (BatchNorm, Dense, Dropout, GroupNorm, InstanceNorm, LayerNorm, Relu,
                        RMSNorm, WeightNorm)
from fnn.layers.norm import batch_norm, group_norm
from fnn.layers.weight_norm import weight_norm, weight_norm_backward

from helpers import rel_err


def assert_backward_matches_vjp(layer, params, state, x, dy, **kw):
    """Hand-derived ``backward`` against ``jax.vjp`` of ``apply``, in one jit (one compilation)."""
    def both(params, x, dy):
        _, vjp = jax.vjp(lambda p, x: layer.apply(p, state, x, **kw)[0], params, x)
        return vjp(dy), layer.backward(params, state, x, dy, **kw)
    (ref_p, ref_x), (dp, dx) = jax.jit(both)(params, x, dy)
    assert jax.tree.structure(dp) == jax.tree.structure(params)
    assert rel_err(dx, ref_x) < 1e-9
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dp), jax.tree.leaves(ref_p)):
        assert rel_err(a, b) < 1e-9, jax.tree_util.keystr(path)


def randomize(params, rng):
    """Params away from their init values (scale 1, offset 0), so scale bugs cannot hide."""
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(1.0, 0.5, p.shape)), params)


# --------------------------------------------------------------------------- NumPy references

def np_standardize(x, axes, eps, center=True):
    x = x - x.mean(axes, keepdims=True) if center else x
    return x / np.sqrt((x * x).mean(axes, keepdims=True) + eps)


def np_affine(xhat, p, feat_axes):
    shape = [d if i in feat_axes else 1 for i, d in enumerate(xhat.shape)]
    y = xhat * np.asarray(p["scale"]).reshape(shape) if "scale" in p else xhat
    return y + np.asarray(p["offset"]).reshape(shape) if "offset" in p else y


def np_group_norm(x, p, groups, eps):
    xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    return np_affine(np_standardize(xg, axes, eps).reshape(x.shape), p, (x.ndim - 1,))


STATELESS = [  # (layer, input shape, NumPy reference y(x, params))
    (LayerNorm(), (3, 5), lambda x, p: np_affine(np_standardize(x, (1,), 1e-5), p, (1,))),
    (LayerNorm(eps=1e-3, axis=(-2, -1)), (2, 3, 4),
     lambda x, p: np_affine(np_standardize(x, (1, 2), 1e-3), p, (1, 2))),
    (RMSNorm(), (2, 3, 4), lambda x, p: np_affine(np_standardize(x, (2,), 1e-6, False), p, (2,))),
    (RMSNorm(use_offset=True), (3, 5),
     lambda x, p: np_affine(np_standardize(x, (1,), 1e-6, False), p, (1,))),
    (InstanceNorm(), (2, 3, 4, 3),
     lambda x, p: np_affine(np_standardize(x, (1, 2), 1e-5), p, (3,))),
    (InstanceNorm(use_scale=False), (2, 5, 3),
     lambda x, p: np_affine(np_standardize(x, (1,), 1e-5), p, (2,))),
    (GroupNorm(2), (2, 3, 3, 4), lambda x, p: np_group_norm(x, p, 2, 1e-5)),
    (GroupNorm(3), (4, 6), lambda x, p: np_group_norm(x, p, 3, 1e-5)),
]


@pytest.mark.parametrize("layer,shape,ref", STATELESS,
                         ids=[f"{l.name}{s}" for l, s, _ in STATELESS])
def test_forward_and_backward_match_references(layer, shape, ref, rng):
    params, state, out = layer.init(jax.random.PRNGKey(0), shape)
    assert state == {} and out == shape
    params = randomize(params, rng)
    x = jnp.asarray(rng.normal(2.0, 3.0, shape))
    y, _ = jax.jit(layer.apply)(params, state, x)
    np.testing.assert_allclose(y, ref(np.asarray(x), params), rtol=1e-12, atol=1e-12)
    assert_backward_matches_vjp(layer, params, state, x, jnp.asarray(rng.normal(size=shape)))


def test_group_norm_limits_are_layer_norm_and_instance_norm(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 2, 6)))
    bare = dict(use_scale=False, use_offset=False)
    apply = lambda l: l.apply(l.init(None, x.shape)[0], {}, x)[0]
    np.testing.assert_allclose(apply(GroupNorm(1, **bare)),
                               apply(LayerNorm(axis=(1, 2, 3), **bare)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(apply(GroupNorm(6, **bare)), apply(InstanceNorm(**bare)),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- batch norm

def np_batch_norm_step(x, p, running, momentum, eps, axis):
    """One training step: output with batch statistics, running stats updated PyTorch-style
    (unbiased variance) with Flax/Keras momentum."""
    feat = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != feat)
    y = np_affine(np_standardize(x, red, eps), p, (feat,))
    mean, var = x.mean(red), x.var(red, ddof=1)
    new = {"mean": momentum * running["mean"] + (1 - momentum) * mean,
           "var": momentum * running["var"] + (1 - momentum) * var}
    return y, new


def np_batch_norm_eval(x, p, running, eps, axis):
    feat = axis % x.ndim
    shape = [d if i == feat else 1 for i, d in enumerate(x.shape)]
    xhat = (x - running["mean"].reshape(shape)) / np.sqrt(running["var"].reshape(shape) + eps)
    return np_affine(xhat, p, (feat,))


BN_CASES = [((8, 4), {}),                                   # after Dense
            ((3, 2, 2, 4), {"momentum": 0.5}),              # after Conv: over batch, h, w
            ((3, 4, 5), {"axis": 1, "eps": 1e-3, "use_offset": False})]


@pytest.mark.parametrize("shape,kw", BN_CASES, ids=[str(s) for s, _ in BN_CASES])
def test_batch_norm_running_statistics_over_several_steps(shape, kw, rng):
    layer = BatchNorm(**kw)
    momentum, eps, axis = kw.get("momentum", 0.9), kw.get("eps", 1e-5), kw.get("axis", -1)
    params, state, _ = layer.init(jax.random.PRNGKey(0), shape)
    c = shape[axis]
    np.testing.assert_array_equal(state["mean"], np.zeros(c))
    np.testing.assert_array_equal(state["var"], np.ones(c))
    params = randomize(params, rng)
    step = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))
    running = {k: np.asarray(v) for k, v in state.items()}
    for t in range(4):
        x = rng.normal(t, 1.0 + t, shape)
        y, state = step(params, state, jnp.asarray(x))
        y_ref, running = np_batch_norm_step(x, params, running, momentum, eps, axis)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for k in running:
            np.testing.assert_allclose(state[k], running[k], rtol=1e-12, atol=1e-12)
    x = rng.normal(1.0, 2.0, shape)
    y, same = layer.apply(params, state, jnp.asarray(x), train=False)
    assert same is state
    np.testing.assert_allclose(y, np_batch_norm_eval(x, params, running, eps, axis),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape,kw", BN_CASES, ids=[str(s) for s, _ in BN_CASES])
def test_batch_norm_backward_matches_vjp(shape, kw, train, rng):
    layer = BatchNorm(**kw)
    params, state, _ = layer.init(jax.random.PRNGKey(0), shape)
    params = randomize(params, rng)
    state = {"mean": jnp.asarray(rng.normal(size=state["mean"].shape)),
             "var": jnp.asarray(rng.uniform(0.5, 2.0, state["var"].shape))}
    x, dy = (jnp.asarray(rng.normal(size=shape)) for _ in range(2))
    assert_backward_matches_vjp(layer, params, state, x, dy, train=train)


def test_batch_norm_train_backward_is_the_closed_form(rng):
    """dx = (scale/σ)/N · (N·dy − Σdy − x̂·Σ(dy·x̂)), written out in NumPy."""
    layer = BatchNorm()
    x, dy = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    params = randomize(layer.init(None, x.shape)[0], rng)
    _, dx = layer.backward(params, layer.init(None, x.shape)[1], jnp.asarray(x), jnp.asarray(dy),
                           train=True)
    n, sigma = x.shape[0], np.sqrt(x.var(0) + 1e-5)
    xhat = (x - x.mean(0)) / sigma
    scale = np.asarray(params["scale"])
    ref = (scale / sigma) / n * (n * dy - dy.sum(0) - xhat * (dy * xhat).sum(0))
    np.testing.assert_allclose(dx, ref, rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------- state threading

def test_state_threads_through_serial_and_params_hold_no_state(rng):
    model = serial(Dense(5), BatchNorm(), Relu(), Dense(3), BatchNorm(momentum=0.5))
    params, state, _ = model.init(jax.random.PRNGKey(1), (6, 4))
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        assert path[-1].key in ("w", "b", "scale", "offset"), path
    assert set(state["1"]) == {"mean", "var"} and state["0"] == state["2"] == state["3"] == {}
    x = jnp.asarray(rng.normal(size=(6, 4)))
    y, new = model.apply(params, state, x, train=True)
    # each BatchNorm's new state is what it gives alone on its own input
    h1 = Dense(5).apply(params["0"], {}, x)[0]
    a1, s1 = BatchNorm().apply(params["1"], state["1"], h1, train=True)
    h3 = Dense(3).apply(params["3"], {}, jnp.maximum(a1, 0))[0]
    y4, s4 = BatchNorm(momentum=0.5).apply(params["4"], state["4"], h3, train=True)
    np.testing.assert_allclose(y, y4, rtol=1e-12, atol=1e-14)
    for n, want in (("1", s1), ("4", s4)):
        for k in ("mean", "var"):
            np.testing.assert_allclose(new[n][k], want[k], rtol=1e-12)
            assert not np.allclose(new[n][k], state[n][k])       # it did move
    _, kept = model.apply(params, new, x, train=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), kept, new))


def test_state_threads_through_residual_and_stack(rng):
    block = serial(Dense(4), BatchNorm(momentum=0.8))
    x = jnp.asarray(rng.normal(size=(5, 4)))
    res = residual(block)
    params, state, _ = res.init(jax.random.PRNGKey(2), x.shape)
    y, new = res.apply(params, state, x, train=True)
    y_b, new_b = block.apply(params, state, x, train=True)
    np.testing.assert_allclose(y, x + y_b, rtol=1e-12)
    np.testing.assert_allclose(new["1"]["var"], new_b["1"]["var"], rtol=1e-12)
    deep = stack(block, 2)
    params, state, _ = deep.init(jax.random.PRNGKey(3), x.shape)
    assert state["1"]["mean"].shape == (2, 4)
    _, new = deep.apply(params, state, x, train=True)
    one = lambda i, h: block.apply(jax.tree.map(lambda a: a[i], params),
                                   jax.tree.map(lambda a: a[i], state), h, train=True)
    h, s0 = one(0, x)
    _, s1 = one(1, h)
    np.testing.assert_allclose(new["1"]["mean"][0], s0["1"]["mean"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new["1"]["mean"][1], s1["1"]["mean"], rtol=1e-12, atol=1e-14)


def test_serial_backward_with_batch_norm_and_dropout_matches_vjp(rng):
    model = serial(Dense(6, use_bias=False), BatchNorm(), Relu(), Dropout(0.3), Dense(2))
    params, state, _ = model.init(jax.random.PRNGKey(4), (7, 3))
    x, key = jnp.asarray(rng.normal(size=(7, 3))), jax.random.PRNGKey(5)
    dy = jnp.asarray(rng.normal(size=(7, 2)))
    assert_backward_matches_vjp(model, params, state, x, dy, key=key, train=True)


# --------------------------------------------------------------------------- weight norm

def test_weight_norm_with_dense(rng):
    dense, wn = Dense(3), WeightNorm(Dense(3))
    p_d, _, _ = dense.init(jax.random.PRNGKey(6), (4, 5))
    params, state, out = wn.init(jax.random.PRNGKey(6), (4, 5))
    assert set(params) == {"v", "g", "b"} and out == (4, 3)
    x = jnp.asarray(rng.normal(size=(4, 5)))
    # at init w = v exactly, so the output is the wrapped layer's
    np.testing.assert_allclose(wn.apply(params, state, x)[0], dense.apply(p_d, {}, x)[0],
                               rtol=1e-12)
    params = {"v": params["v"], "g": jnp.asarray(rng.normal(size=3)),
              "b": jnp.asarray(rng.normal(size=3))}
    v, g = np.asarray(params["v"]), np.asarray(params["g"])
    w = g[None, :] * v / np.sqrt((v ** 2).sum(0))[None, :]
    y, _ = wn.apply(params, state, x)
    np.testing.assert_allclose(y, np.asarray(x) @ w + np.asarray(params["b"])[None, :], rtol=1e-12)
    # the output is invariant to the scale of v, so dv is orthogonal to each column of v
    y2, _ = wn.apply({**params, "v": 3.0 * params["v"]}, state, x)
    np.testing.assert_allclose(y2, y, rtol=1e-12)
    dy = jnp.asarray(rng.normal(size=(4, 3)))
    dp, _ = wn.backward(params, state, x, dy)
    np.testing.assert_allclose(jnp.sum(dp["v"] * params["v"], 0), 0.0, atol=1e-12)
    assert_backward_matches_vjp(wn, params, state, x, dy)


def test_weight_norm_backward_matches_vjp_on_a_kernel(rng):
    v, g, dw = (jnp.asarray(rng.normal(size=s)) for s in ((2, 3, 4, 5), (5,), (2, 3, 4, 5)))
    _, vjp = jax.vjp(weight_norm, v, g)
    ref_v, ref_g = vjp(dw)
    dv, dg = weight_norm_backward(v, g, dw)
    assert rel_err(dv, ref_v) < 1e-9 and rel_err(dg, ref_g) < 1e-9


def test_weight_norm_with_conv(rng):
    conv = pytest.importorskip("fnn.layers.conv")
    wn = WeightNorm(conv.Conv(3, (2, 2)))
    params, state, out = wn.init(jax.random.PRNGKey(7), (2, 4, 4, 2))
    assert params["v"].shape == (2, 2, 2, 3) and params["g"].shape == (3,)
    params = {**params, "g": jnp.asarray(rng.normal(size=3))}
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 2)))
    assert out == (2, 4, 4, 3)
    assert_backward_matches_vjp(wn, params, state, x, jnp.asarray(rng.normal(size=out)))


# --------------------------------------------------------------------------- errors

def test_error_messages():
    x = jnp.ones((4, 5))
    p, s, _ = BatchNorm().init(None, (4, 3))
    with pytest.raises(ValueError, match=r"BatchNorm.*feature shape \(5,\), but 'scale' has "
                                          r"shape \(3,\)"):
        BatchNorm().apply(p, s, x)
    with pytest.raises(ValueError, match=r"BatchNorm.*feature shape \(3,\), but 'mean' has shape"):
        BatchNorm().apply(p, {**s, "mean": jnp.zeros(5)}, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="BatchNorm.*more than one value per feature"):
        BatchNorm().apply(p, s, jnp.ones((1, 3)), train=True)
    with pytest.raises(ValueError, match=r"BatchNorm.*expected input \(batch, \.\.\., features\)"):
        BatchNorm().init(None, (4,))
    with pytest.raises(ValueError, match="BatchNorm.*not the batch axis"):
        BatchNorm(axis=0).init(None, (4, 3))
    with pytest.raises(ValueError, match="batch_norm: give both mean and var"):
        batch_norm(x, mean=jnp.zeros(5))
    with pytest.raises(ValueError, match=r"BatchNorm: momentum must be in \[0, 1\]"):
        BatchNorm(momentum=1.5)
    with pytest.raises(ValueError, match="LayerNorm.*axis 3 is out of range .* rank 2"):
        LayerNorm(axis=3).init(None, (4, 5))
    with pytest.raises(ValueError, match="LayerNorm.*not the batch axis"):
        LayerNorm(axis=(0, 1)).init(None, (4, 5))
    with pytest.raises(ValueError, match="RMSNorm.*repeats an axis"):
        RMSNorm(axis=(1, -1)).init(None, (4, 5))
    with pytest.raises(ValueError, match=r"GroupNorm\(2\).*divisible by 2, got shape \(4, 5\)"):
        GroupNorm(2).init(None, (4, 5))
    with pytest.raises(ValueError, match="group_norm: 5 channels do not split into 2 groups"):
        group_norm(x, groups=2)
    with pytest.raises(ValueError, match=r"weight_norm: g must have shape \(3,\)"):
        weight_norm(jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="GroupNorm: groups must be a positive int"):
        GroupNorm(0)
    with pytest.raises(ValueError, match=r"InstanceNorm.*rank >= 3.*got shape \(4, 5\)"):
        InstanceNorm().init(None, (4, 5))
    with pytest.raises(TypeError, match="LayerNorm.*expected an array input, got list"):
        LayerNorm().apply(*LayerNorm().init(None, (1, 2))[:2], [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"WeightNorm\(LayerNorm.*needs a kernel params\['w'\]"):
        WeightNorm(LayerNorm()).init(None, (4, 5))
    with pytest.raises(ValueError, match="WeightNorm.*expected params with 'v' and 'g'"):
        WeightNorm(Dense(2)).apply({"w": jnp.ones((5, 2))}, {}, x)
