"""Convolutions: forward against float64 NumPy loops written from the definitions, hand-derived
backward against ``jax.vjp`` (both kernel-gradient formulations), shapes, errors, init."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import backprop, losses
from fnn.combinators import serial
from fnn.layers import Conv, ConvTranspose, Dense, Flatten, MaxPool, Relu
from fnn.layers import conv as C
from fnn.layers._conv_col2im import col2im_applies

from helpers import assert_trees_close, no_autodiff, rel_err, tree_scale


def tup(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


# --------------------------------------------------------------------------- NumPy references

def np_same_pads(sizes, k_eff, strides):
    """TF/XLA 'SAME': output ceil(n/s); the odd padding cell goes to the high end."""
    pads = []
    for n, k, s in zip(sizes, k_eff, strides):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def np_pads(padding, sizes, k_eff, strides):
    if padding == "SAME":
        return np_same_pads(sizes, k_eff, strides)
    if padding == "VALID":
        return [(0, 0)] * len(sizes)
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def np_conv(x, w, strides=1, padding="SAME", dilation=1, groups=1):
    """y[b, o, f] = Σ_k Σ_{c in group(f)} xpad[b, o·s + k·d, c] w[k, c, f], as loops."""
    n = w.ndim - 2
    s, d, K = tup(strides, n), tup(dilation, n), w.shape[:n]
    k_eff = [(k - 1) * dd + 1 for k, dd in zip(K, d)]
    pads = np_pads(padding, x.shape[1:-1], k_eff, s)
    xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
    cg, O = w.shape[-2], w.shape[-1]
    og = O // groups
    out = [(xp.shape[1 + i] - k_eff[i]) // s[i] + 1 for i in range(n)]
    y = np.zeros((x.shape[0], *out, O))
    for o in np.ndindex(*out):
        for k in np.ndindex(*K):
            patch = xp[(slice(None),) + tuple(o[i] * s[i] + k[i] * d[i] for i in range(n))]
            for g in range(groups):
                y[(slice(None), *o, slice(g * og, (g + 1) * og))] += \
                    patch[:, g * cg:(g + 1) * cg] @ w[k][:, g * og:(g + 1) * og]
    return y


def np_conv_transpose_torch(x, w, strides, p, q, dilation, groups):
    """PyTorch's ConvTranspose definition, scattered: y[i·s + k·d - p] += x[i]·w[k];
    output (n-1)·s - 2p + d(K-1) + 1 + q (``w`` in fnn's (*K, C/G, O) layout)."""
    n = w.ndim - 2
    s, d, K = tup(strides, n), tup(dilation, n), w.shape[:n]
    cg, O = w.shape[-2], w.shape[-1]
    og = O // groups
    out = [(x.shape[1 + i] - 1) * s[i] - 2 * p[i] + d[i] * (K[i] - 1) + 1 + q[i] for i in range(n)]
    full = [o + 2 * pp + 2 * (K[i] - 1) * d[i] + s[i] for i, (o, pp) in enumerate(zip(out, p))]
    y = np.zeros((x.shape[0], *full, O))
    for i in np.ndindex(*x.shape[1:-1]):
        for k in np.ndindex(*K):
            at = tuple(i[a] * s[a] + k[a] * d[a] for a in range(n))
            for g in range(groups):
                y[(slice(None), *at, slice(g * og, (g + 1) * og))] += \
                    x[(slice(None), *i, slice(g * cg, (g + 1) * cg))] @ w[k][:, g * og:(g + 1) * og]
    crop = tuple(slice(pp, pp + o) for pp, o in zip(p, out))
    return y[(slice(None), *crop, slice(None))]


def draw(rng, *shapes):
    return [rng.standard_normal(s) for s in shapes]


def np_init(rng):
    """A NumPy-drawn initializer: keeps tests off jax.random's per-shape compilations."""
    return lambda key, shape, dtype=None: jnp.asarray(0.5 * rng.standard_normal(shape), dtype)


# --------------------------------------------------------------------------- forward

CONV_CASES = [  # (x shape, w shape, kwargs)
    ((2, 7, 3), (3, 3, 4), dict(strides=2)),                                       # 1D, odd
    ((2, 9, 3), (3, 3, 2), dict(dilation=2, padding="VALID")),
    ((2, 5, 7, 4), (3, 3, 2, 6), dict(groups=2)),                                  # 2D SAME
    ((2, 7, 6, 3), (3, 2, 1, 6), dict(groups=3, strides=2, padding="SAME")),       # depthwise
    ((1, 9, 8, 2), (3, 3, 2, 3), dict(strides=(2, 3), dilation=(2, 1), padding=((2, 1), 1))),
    ((1, 5, 4, 3, 2), (2, 3, 2, 2, 3), dict(strides=2, padding="SAME")),           # 3D
    ((1, 4, 5, 5, 2), (3, 2, 3, 1, 4), dict(groups=2, padding="VALID", dilation=(1, 2, 1))),
]


@pytest.mark.parametrize("xs,ws,kw", CONV_CASES)
def test_conv_forward_matches_numpy_loops(xs, ws, kw, rng):
    x, w = draw(rng, xs, ws)
    y = C.conv(jnp.asarray(x), jnp.asarray(w), **kw)
    ref = np_conv(x, w, **kw)
    assert y.shape == ref.shape == C.conv_output_shape(xs, ws, **kw)
    assert rel_err(y, ref) < 1e-12


TRANSPOSE_CASES = [  # (x, w shapes, strides, torch padding p, output_padding q, dilation, groups)
    ((2, 5, 3), (3, 3, 4), 2, (1,), (1,), 1, 1),
    ((2, 4, 2), (4, 2, 4), 3, (0,), (2,), 2, 1),
    ((1, 3, 4, 4), (3, 2, 2, 6), (2, 1), (1, 0), (0, 0), 1, 2),
    ((1, 3, 3, 2, 2), (2, 2, 3, 2, 3), 2, (0, 1, 1), (1, 0, 1), 1, 1),
]


@pytest.mark.parametrize("xs,ws,s,p,q,d,g", TRANSPOSE_CASES)
def test_conv_transpose_matches_pytorch_definition(xs, ws, s, p, q, d, g, rng):
    """The documented mapping: PyTorch's (p, output_padding q) is explicit padding
    (k_eff-1-p, k_eff-1-p+q) with the kernel flipped."""
    x, w = draw(rng, xs, ws)
    n = len(ws) - 2
    k_eff = [(k - 1) * dd + 1 for k, dd in zip(ws[:n], tup(d, n))]
    pads = [(k - 1 - pp, k - 1 - pp + qq) for k, pp, qq in zip(k_eff, p, q)]
    wf = np.flip(w, axis=tuple(range(n))).copy()
    y = C.conv_transpose(jnp.asarray(x), jnp.asarray(wf), s, pads, d, g)
    ref = np_conv_transpose_torch(x, w, s, p, q, d, g)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-12


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("xs,ws,s,d", [((2, 5, 3), (3, 3, 2), 2, 1), ((1, 4, 3, 2), (4, 3, 2, 3),
                                                                       (3, 2), (1, 2))])
def test_conv_transpose_same_valid_match_lax(xs, ws, s, d, padding, rng):
    x, w = draw(rng, xs, ws)
    n = len(ws) - 2
    dims = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[n]
    y = C.conv_transpose(jnp.asarray(x), jnp.asarray(w), s, padding, d)
    ref = jax.lax.conv_transpose(x, w, tup(s, n), padding, rhs_dilation=tup(d, n),
                                 dimension_numbers=dims)
    assert y.shape == ref.shape == C.conv_transpose_output_shape(xs, ws, s, padding, d)
    if padding == "SAME":
        assert y.shape[1:-1] == tuple(a * b for a, b in zip(xs[1:-1], tup(s, n)))
    assert rel_err(y, ref) < 1e-12


def test_conv_and_conv_transpose_are_adjoint(rng):
    """<conv(x, w), y> = <x, conv_transpose(y, flip_swap(w))> with the backward's padding."""
    x, w = draw(rng, (2, 6, 5, 4), (3, 3, 2, 6))
    x, w = jnp.asarray(x), jnp.asarray(w)
    y = jnp.asarray(rng.standard_normal(C.conv_output_shape(x.shape, w.shape, 2, "SAME", 1, 2)))
    _, dx = C.conv_backward(x, w, y, 2, "SAME", 1, 2)
    lhs = jnp.vdot(C.conv(x, w, 2, "SAME", 1, 2), y)
    assert abs(float(lhs - jnp.vdot(x, dx))) < 1e-10 * abs(float(lhs))


# --------------------------------------------------------------------------- backward

BACKWARD_CASES = [("conv", xs, ws, kw) for xs, ws, kw in CONV_CASES] + [
    ("conv", (2, 8, 3), (3, 3, 2), dict(strides=3, padding=((2, 0),))),  # unused tail cells
    ("conv_transpose", (2, 5, 3), (3, 3, 4), dict(strides=2)),
    ("conv_transpose", (2, 4, 4), (4, 2, 6), dict(strides=3, padding="VALID", dilation=2,
                                                  groups=2)),
    ("conv_transpose", (1, 3, 4, 2), (3, 2, 2, 3), dict(strides=(2, 1), padding=((1, 3), (0, 1)))),
    ("conv_transpose", (1, 2, 3, 2, 4), (2, 2, 2, 1, 4), dict(strides=2, groups=4)),
]


def _col2im_applies(xs, ws, kw) -> bool:
    g = {"strides": 1, "padding": "SAME", "dilation": 1, "groups": 1, **kw}
    pads = C.conv_geometry("conv", xs, ws, g["strides"], g["padding"], g["dilation"],
                           g["groups"])[3]
    return col2im_applies(pads, g["groups"])


@pytest.mark.parametrize("method", ["conv", "im2col"])
@pytest.mark.parametrize("op,xs,ws,kw", BACKWARD_CASES)
def test_backward_matches_vjp(op, xs, ws, kw, method, rng, monkeypatch):
    fwd, bwd = {"conv": (C.conv, C.conv_backward),
                "conv_transpose": (C.conv_transpose, C.conv_transpose_backward)}[op]
    x, w = (jnp.asarray(a) for a in draw(rng, xs, ws))
    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(lambda: fwd(x, w, **kw)).shape))
    ref_x, ref_w = jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: fwd(x, w, **kw), x, w)[1](dy))(
        x, w, dy)
    forms = dict(kernel_grad=method)
    if op == "conv" and method == "im2col":     # and the input gradient by col2im, where it applies
        forms["input_grad"] = "col2im" if _col2im_applies(xs, ws, kw) else "conv"
    with no_autodiff(monkeypatch):
        dw, dx = jax.jit(lambda x, w, dy: bwd(x, w, dy, **kw, **forms))(x, w, dy)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert rel_err(dx, ref_x) < 1e-9
    assert rel_err(dw, ref_w) < 1e-9


def test_col2im_covers_the_backward_cases():
    """The col2im input gradient is checked above on most convolution cases (one group, no
    cropping padding)."""
    applies = [_col2im_applies(xs, ws, kw) for op, xs, ws, kw in BACKWARD_CASES if op == "conv"]
    assert sum(applies) >= 4 and not all(applies)


def test_auto_kernel_grad_follows_the_table(monkeypatch, rng):
    x, w = (jnp.asarray(a) for a in draw(rng, (1, 4, 4, 2), (3, 3, 2, 2)))
    dy = jnp.ones((1, 4, 4, 2))
    calls = []
    real = jax.lax.conv_general_dilated
    monkeypatch.setattr(jax.lax, "conv_general_dilated",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setitem(C.KERNEL_GRAD, jax.default_backend(), "conv")
    C.conv_backward(x, w, dy)
    assert any(k.get("batch_group_count") for k in calls)       # the kernel gradient as a conv
    calls.clear()
    monkeypatch.setitem(C.KERNEL_GRAD, jax.default_backend(), "im2col")
    C.conv_backward(x, w, dy)
    assert len(calls) == 1                                       # only the input gradient
    with pytest.raises(ValueError, match="kernel_grad must be 'auto', 'conv' or 'im2col'"):
        C.conv_backward(x, w, dy, kernel_grad="fft")
    with pytest.raises(ValueError, match="input_grad must be 'auto', 'conv' or 'col2im'"):
        C.conv_backward(x, w, dy, input_grad="fft")
    with pytest.raises(ValueError, match=r"input_grad='col2im' needs one feature group .* "
                                         r"got groups=2"):
        C.conv_backward(x, w[..., :1, :], dy, groups=2, input_grad="col2im")


# --------------------------------------------------------------------------- layers

def test_cnn_shape_inference_and_manual_gradients(key, rng, monkeypatch):
    w = np_init(rng)
    model = serial(Conv(4, (3, 3), w_init=w), Relu(),
                   Conv(6, (3, 3), strides=2, padding="VALID", w_init=w), Relu(),
                   MaxPool((2, 2)), Flatten(), Dense(5, w_init=w))
    params, state, out = model.init(key, (3, 11, 9, 2))
    assert params["0"]["w"].shape == (3, 3, 2, 4) and params["2"]["w"].shape == (3, 3, 4, 6)
    assert params["6"]["w"].shape == (2 * 2 * 6, 5)          # 11x9 -> 5x4 -> 2x2, 6 channels
    x = jnp.asarray(rng.standard_normal((3, 11, 9, 2)))
    y, _ = model.apply(params, state, x)
    assert y.shape == out == (3, 5)
    labels = jnp.array([0, 3, 4])
    loss = losses.softmax_cross_entropy_with_integer_labels
    ref_v, ref_g = jax.jit(jax.value_and_grad(
        lambda p: loss(model.apply(p, state, x)[0], labels)))(params)
    auto_g = jax.jit(jax.grad(
        lambda p: loss(backprop.custom_vjp(model).apply(p, state, x)[0], labels)))(params)
    manual = jax.jit(backprop.value_and_grad(model, loss))
    with no_autodiff(monkeypatch):
        (v, _), g = manual(params, state, x, labels)
    assert abs(float(v - ref_v)) < 1e-12
    # per entry, atol at the tree's scale: stricter than each leaf's max error < 1e-9 of its
    # largest entry for leaves above 1/900 of the tree's largest (the smallest here is 1/9)
    tol = dict(rtol=1e-10, atol=1e-12 * tree_scale(ref_g))
    assert_trees_close(g, ref_g, **tol, what="hand-derived grads")
    assert_trees_close(auto_g, ref_g, **tol, what="custom_vjp grads")


def test_conv_transpose_layer_upsamples(key, rng):
    layer = ConvTranspose(3, (3, 3), strides=2, w_init=np_init(rng))
    params, _, out = layer.init(key, (2, 4, 5, 6))
    assert out == (2, 8, 10, 3) and params["w"].shape == (3, 3, 6, 3)


def test_he_init_counts_the_receptive_field(key):
    params, _, _ = Conv(64, (3, 3), groups=2).init(key, (1, 8, 8, 32))
    w = np.asarray(params["w"])
    assert w.shape == (3, 3, 16, 64) and np.all(np.asarray(params["b"]) == 0)
    fan_in = 3 * 3 * 16
    assert abs(w.std() / math.sqrt(2 / fan_in) - 1) < 0.03
    assert abs(w.mean()) < 0.01


# --------------------------------------------------------------------------- errors

def test_channels_first_input_is_refused_with_a_hint(key, rng):
    layer = Conv(8, (3, 3), w_init=np_init(rng))
    params, state, _ = layer.init(key, (2, 10, 10, 3))
    with pytest.raises(ValueError, match=r"Conv: expected 3 input channels .* channels-first"):
        layer.apply(params, state, jnp.zeros((2, 3, 10, 10)))
    with pytest.raises(ValueError, match=r"Conv: expected input of rank 4 \(batch, height, width, "
                                         r"channels\), got shape \(3, 10, 10\)"):
        layer.init(key, (3, 10, 10))
    with pytest.raises(ValueError, match=r"conv: expected input of rank 3 \(batch, width"):
        C.conv(jnp.zeros((2, 5)), jnp.zeros((3, 5, 4)))


def test_kernel_larger_than_valid_input(key, rng):
    with pytest.raises(ValueError, match=r"Conv: kernel of effective size 5 \(kernel 3, "
                                         r"dilation 2\) is larger than the padded input"):
        Conv(4, (3, 3), padding="VALID", dilation=2).init(key, (1, 4, 6, 1))
    _, _, out = Conv(4, (3, 3), padding="SAME", dilation=2, w_init=np_init(rng)).init(
        key, (1, 4, 6, 1))                                                  # SAME pads: fine
    assert out == (1, 4, 6, 4)


def test_bad_arguments_are_refused(key):
    with pytest.raises(ValueError, match=r"Conv: kernel_size must be a tuple with one entry per "
                                         r"spatial axis .* got 3"):
        Conv(4, 3)
    with pytest.raises(ValueError, match="Conv: features=6 is not divisible by groups=4"):
        Conv(6, (3,), groups=4)
    with pytest.raises(ValueError, match=r"Conv: 6 input channels .* not divisible by groups=4"):
        Conv(8, (3,), groups=4).init(key, (1, 5, 6))
    with pytest.raises(ValueError, match="Conv: strides must be a positive int or 2 positive ints"):
        Conv(4, (3, 3), strides=(1, 2, 1))
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID' or explicit, got 'FULL'"):
        Conv(4, (3, 3), padding="FULL").init(key, (1, 5, 5, 1))
    with pytest.raises(ValueError, match=r"padding must be 'SAME', 'VALID', an int"):
        Conv(4, (3, 3), padding=((1, 1, 1),)).init(key, (1, 5, 5, 1))
    with pytest.raises(ValueError, match="Conv: kernel_grad must be 'auto', 'conv' or 'im2col'"):
        Conv(4, (3,), kernel_grad="winograd")
    with pytest.raises(ValueError, match="ConvTranspose: padding .* leaves no output"):
        ConvTranspose(2, (3,), padding=((-3, -3),)).init(key, (1, 2, 1))
