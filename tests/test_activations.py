"""Activations: values and hand-derived derivatives against float64 NumPy references written
from the formulas and against jax.grad / jax.vjp; stability at |z| = 1e4; layer forms."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import activations as A
from fnn import layers as L

SELU_ALPHA, SELU_SCALE = 1.6732632423543772848, 1.0507009873554804934
C = math.sqrt(2 / math.pi)
_erf = np.vectorize(math.erf)


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_phi(z):        # standard normal cdf and pdf
    return 0.5 * (1 + _erf(z / math.sqrt(2))), np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)


def np_gelu_tanh_grad(z):
    u = C * (z + 0.044715 * z ** 3)
    sech2 = 1 / np.cosh(u) ** 2
    return 0.5 * (1 + np.tanh(u)) + 0.5 * z * sech2 * C * (1 + 3 * 0.044715 * z ** 2)


# name -> (fn, kwargs, reference f, reference f'), references written from the formulas
ELEMENTWISE = {
    "step": (A.step, {}, lambda z: (z > 0) * 1.0, lambda z: 0 * z),
    "identity": (A.identity, {}, lambda z: z, lambda z: 1 + 0 * z),
    "sigmoid": (A.sigmoid, {}, np_sigmoid, lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
    "tanh": (A.tanh, {}, lambda z: (np.exp(2 * z) - 1) / (np.exp(2 * z) + 1),
             lambda z: 1 / np.cosh(z) ** 2),
    "relu": (A.relu, {}, lambda z: z * (z > 0), lambda z: (z > 0) * 1.0),
    "leaky_relu": (A.leaky_relu, {}, lambda z: np.where(z > 0, z, 0.01 * z),
                   lambda z: np.where(z > 0, 1.0, 0.01)),
    "leaky_relu(0.2)": (A.leaky_relu, {"alpha": 0.2}, lambda z: np.where(z > 0, z, 0.2 * z),
                        lambda z: np.where(z > 0, 1.0, 0.2)),
    "elu": (A.elu, {}, lambda z: np.where(z > 0, z, np.exp(z) - 1),
            lambda z: np.where(z > 0, 1.0, np.exp(z))),
    "elu(0.5)": (A.elu, {"alpha": 0.5}, lambda z: np.where(z > 0, z, 0.5 * (np.exp(z) - 1)),
                 lambda z: np.where(z > 0, 1.0, 0.5 * np.exp(z))),
    "selu": (A.selu, {}, lambda z: SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * (np.exp(z) - 1)),
             lambda z: SELU_SCALE * np.where(z > 0, 1.0, SELU_ALPHA * np.exp(z))),
    "gelu": (A.gelu, {}, lambda z: z * np_phi(z)[0],
             lambda z: np_phi(z)[0] + z * np_phi(z)[1]),
    "gelu(tanh)": (A.gelu, {"approximate": True},
                   lambda z: 0.5 * z * (1 + np.tanh(C * (z + 0.044715 * z ** 3))),
                   np_gelu_tanh_grad),
    "gelu_tanh": (A.gelu_tanh, {}, lambda z: 0.5 * z * (1 + np.tanh(C * (z + 0.044715 * z ** 3))),
                  np_gelu_tanh_grad),
    "quick_gelu": (A.quick_gelu, {}, lambda z: z / (1 + np.exp(-1.702 * z)),
                   lambda z: np_sigmoid(1.702 * z) * (1 + 1.702 * z * (1 - np_sigmoid(1.702 * z)))),
    "swish": (A.swish, {}, lambda z: z * np_sigmoid(z),
              lambda z: np_sigmoid(z) * (1 + z * (1 - np_sigmoid(z)))),
    "silu": (A.silu, {}, lambda z: z / (1 + np.exp(-z)),
             lambda z: np_sigmoid(z) * (1 + z * (1 - np_sigmoid(z)))),
    "softplus": (A.softplus, {}, lambda z: np.log(1 + np.exp(z)), np_sigmoid),
    "prelu": (A.prelu, {"alpha": np.array([0.1, 0.2, 0.3, -0.5, 2.0])},
              lambda z: np.where(z > 0, z, np.array([0.1, 0.2, 0.3, -0.5, 2.0])[None, :] * z),
              lambda z: np.where(z > 0, 1.0, np.broadcast_to([0.1, 0.2, 0.3, -0.5, 2.0], z.shape))),
}
NAMES = list(ELEMENTWISE)


_R = np.random.default_rng(1)
Z = 3 * _R.standard_normal((4, 5))
Z = np.where(np.abs(Z) < 1e-3, 0.5, Z)                           # keep away from kinks at 0
DY = _R.standard_normal((4, 5))
BIG = np.resize([-1e4, -1e3, -50.0, 0.0, 50.0, 1e3, 1e4], (4, 5))   # BIG[0, 0] = -1e4, BIG[1, 1] = 1e4


@functools.lru_cache(maxsize=None)
def results(name):
    """Everything the tests check for one activation, in one compiled call (compiles dominate
    the run time): values, .grad, .vjp, jax.grad and jax.vjp at Z; values and derivatives at BIG
    in float64 and float32."""
    fn, kw, _, _ = ELEMENTWISE[name]
    f = lambda a: fn(a, **kw)

    def run(z, dy, big64, big32):
        auto_grad = jax.grad(lambda a: jnp.sum(f(a)))(z)   # elementwise: ∂Σf/∂z_i = f'(z_i)
        auto_vjp = jax.vjp(f, z)[1](dy)[0]
        stable = {}
        for b in (big64, big32):    # array parameters (prelu's alpha) in the input's dtype
            k = {n: jnp.asarray(a, b.dtype) if isinstance(a, np.ndarray) else a for n, a in kw.items()}
            stable[str(b.dtype)] = fn(b, **k), fn.grad(b, **k), fn.vjp(b, jnp.ones_like(b), **k)
        return f(z), fn.grad(z, **kw), fn.vjp(z, dy, **kw), auto_grad, auto_vjp, stable
    return jax.jit(run)(jnp.asarray(Z), jnp.asarray(DY), jnp.asarray(BIG, jnp.float64),
                        jnp.asarray(BIG, jnp.float32))


@pytest.mark.parametrize("name", NAMES)
def test_value_matches_numpy(name):
    _, _, ref, _ = ELEMENTWISE[name]
    y = results(name)[0]
    assert y.shape == Z.shape and y.dtype == jnp.float64
    np.testing.assert_allclose(y, ref(Z), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_grad_and_vjp_match_numpy_and_autodiff(name):
    _, _, _, dref = ELEMENTWISE[name]
    _, g, v, auto_grad, auto_vjp, _ = results(name)
    np.testing.assert_allclose(g, dref(Z), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(v, DY * dref(Z), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g, auto_grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(v, auto_vjp, rtol=1e-12, atol=1e-14)


def test_eager_equals_jit():
    fn, kw, _, _ = ELEMENTWISE["gelu(tanh)"]
    y, g, v = results("gelu(tanh)")[:3]
    z, dy = jnp.asarray(Z), jnp.asarray(DY)
    np.testing.assert_allclose(fn(z, **kw), y, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fn.grad(z, **kw), g, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fn.vjp(z, dy, **kw), v, rtol=1e-12, atol=1e-15)


def test_relu_derivative_is_zero_at_zero():
    assert float(A.relu.grad(jnp.zeros(()))) == 0.0     # PyTorch's and jax.nn.relu's choice
    assert float(jax.grad(jax.nn.relu)(0.0)) == 0.0


def test_silu_is_swish():
    assert A.silu is A.swish


# --------------------------------------------------------------------------- softmax family

def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_softmax_jacobian(z):   # J[..., i, j] = ∂s_i/∂z_j = s_i (δ_ij - s_j)
    s = np_softmax(z)
    return s[..., :, None] * (np.eye(z.shape[-1]) - s[..., None, :])


@pytest.mark.parametrize("shape,axis", [((4, 5), -1), ((3, 4, 5), -1), ((3, 4, 5), 0)])
def test_softmax_and_log_softmax_match_numpy_and_vjp(shape, axis, rng):
    z = 3 * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    zm, dym = np.moveaxis(z, axis, -1), np.moveaxis(dy, axis, -1)   # reference on the last axis
    back = lambda a: np.moveaxis(a, -1, axis)

    def run(z, dy):
        out = []
        for fn in (A.softmax, A.log_softmax):
            y, vjp = jax.vjp(lambda a: fn(a, axis=axis), z)
            out.append((y, fn.vjp(z, dy, axis=axis), vjp(dy)[0]))
        return out
    (s_got, s_vjp, s_auto), (ls_got, ls_vjp, ls_auto) = jax.jit(run)(jnp.asarray(z), jnp.asarray(dy))
    s = np_softmax(zm)
    np.testing.assert_allclose(s_got, back(s), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ls_got, back(zm - np.log(np.exp(zm).sum(-1, keepdims=True))),
                               rtol=1e-12)
    J_log = np.eye(zm.shape[-1]) - s[..., None, :]       # ∂ log s_i / ∂z_j = δ_ij - s_j
    for got, auto, jac in ((s_vjp, s_auto, np_softmax_jacobian(zm)), (ls_vjp, ls_auto, J_log)):
        np.testing.assert_allclose(got, back(np.einsum("...i,...ij->...j", dym, jac)),
                                   rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(got, auto, rtol=1e-11, atol=1e-14)


# --------------------------------------------------------------------------- stability

# name -> (f(-1e4), f(1e4), f'(-1e4), f'(1e4)): the limits, from the formulas
LIMITS = {
    "step": (0, 1, 0, 0), "identity": (-1e4, 1e4, 1, 1),
    "sigmoid": (0, 1, 0, 0), "tanh": (-1, 1, 0, 0), "relu": (0, 1e4, 0, 1),
    "leaky_relu": (-100, 1e4, 0.01, 1), "leaky_relu(0.2)": (-2e3, 1e4, 0.2, 1),
    "elu": (-1, 1e4, 0, 1), "elu(0.5)": (-0.5, 1e4, 0, 1),
    "selu": (-SELU_SCALE * SELU_ALPHA, SELU_SCALE * 1e4, 0, SELU_SCALE),
    "gelu": (0, 1e4, 0, 1), "gelu(tanh)": (0, 1e4, 0, 1), "gelu_tanh": (0, 1e4, 0, 1),
    "quick_gelu": (0, 1e4, 0, 1), "swish": (0, 1e4, 0, 1),
    "silu": (0, 1e4, 0, 1), "softplus": (0, 1e4, 0, 1),
    "prelu": (-1e3, 1e4, 0.1, 1),                   # BIG[0, 0] meets alpha[0] = 0.1
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", list(LIMITS))
def test_stable_at_1e4(name, dtype):
    y, g, v = results(name)[5][jnp.dtype(dtype).name]
    for a in (y, g, v):
        assert a.dtype == dtype and bool(jnp.all(jnp.isfinite(a))), (name, a)
    lo, hi, glo, ghi = LIMITS[name]
    rtol = 1e-6 if dtype == jnp.float32 else 1e-12
    got = [y[0, 0], y[1, 1], g[0, 0], g[1, 1]]                  # z = -1e4 and z = 1e4
    np.testing.assert_allclose(got, [lo, hi, glo, ghi], rtol=rtol, atol=1e-30)
    np.testing.assert_array_equal(v, g)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_softmax_family_stable_at_1e4(dtype):
    z = jnp.asarray([[1e4, 0, -1e4], [-1e4, -1e4, -1e4], [1e4, 1e4, 0], [1e4, -1e4, 1e4]], dtype)
    l2, l3 = math.log(2), math.log(3)
    s_ref = [[1, 0, 0], [1 / 3] * 3, [0.5, 0.5, 0], [0.5, 0, 0.5]]
    ls_ref = [[0, -1e4, -2e4], [-l3] * 3, [-l2, -l2, -1e4 - l2], [-l2, -2e4 - l2, -l2]]
    rtol = 1e-6 if dtype == jnp.float32 else 1e-12
    dy = jnp.asarray([[1.0, -2.0, 3.0]] * 4, dtype)
    s, ls = A.softmax(z), A.log_softmax(z)
    np.testing.assert_allclose(s, s_ref, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(ls, ls_ref, rtol=rtol)
    for a in (s, ls, A.softmax.vjp(z, dy), A.log_softmax.vjp(z, dy)):
        assert a.dtype == dtype and bool(jnp.all(jnp.isfinite(a)))
    # log_softmax vjp: dy - s·Σdy (Σdy = 2)
    np.testing.assert_allclose(A.log_softmax.vjp(z, dy), np.asarray(dy) - 2 * np.asarray(s_ref),
                               rtol=rtol, atol=1e-6)


# --------------------------------------------------------------------------- layer forms

LAYERS = [
    (L.Relu, (), A.relu, {}), (L.Sigmoid, (), A.sigmoid, {}), (L.Tanh, (), A.tanh, {}),
    (L.LeakyRelu, (0.3,), A.leaky_relu, {"alpha": 0.3}), (L.Elu, (0.7,), A.elu, {"alpha": 0.7}),
    (L.Selu, (), A.selu, {}), (L.Gelu, (), A.gelu, {}),
    (L.Gelu, (True,), A.gelu, {"approximate": True}), (L.Gelu, (True,), A.gelu_tanh, {}),
    (L.QuickGelu, (), A.quick_gelu, {}), (L.Swish, (), A.swish, {}),
    (L.Softplus, (), A.softplus, {}), (L.Softmax, (), A.softmax, {}),
    (L.LogSoftmax, (), A.log_softmax, {}),
]


@pytest.mark.parametrize("ctor,args,fn,kw", LAYERS, ids=[f"{c.__name__}{a}" for c, a, _, _ in LAYERS])
def test_layer_forms_apply_their_function(ctor, args, fn, kw, key, rng):
    layer = ctor(*args)
    x = jnp.asarray(2 * rng.standard_normal((4, 5)))
    dy = jnp.asarray(rng.standard_normal((4, 5)))
    params, state, out = layer.init(key, x.shape)
    assert params == {} and state == {} and out == x.shape
    y, _ = layer.apply(params, state, x)
    np.testing.assert_array_equal(y, fn(x, **kw))
    _, dx = layer.backward(params, state, x, dy)
    np.testing.assert_array_equal(dx, fn.vjp(x, dy, **kw))


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5)])
def test_prelu_layer_forward_numpy_backward_vjp(shape, key, rng):
    layer = L.PRelu(0.1)
    params, state, out = layer.init(key, shape)
    assert out == shape and params["alpha"].shape == (shape[-1],)
    np.testing.assert_array_equal(params["alpha"], np.full(shape[-1], 0.1))
    params = {"alpha": jnp.asarray(rng.uniform(-1, 1, shape[-1]))}
    x = jnp.asarray(rng.standard_normal(shape))
    dy = jnp.asarray(rng.standard_normal(shape))
    y, _ = layer.apply(params, state, x)
    xn, an = np.asarray(x), np.asarray(params["alpha"])
    np.testing.assert_allclose(y, np.where(xn > 0, xn, an * xn), rtol=1e-12, atol=1e-15)
    _, vjp = jax.vjp(lambda p, x: layer.apply(p, state, x)[0], params, x)
    ref_p, ref_x = vjp(dy)
    dp, dx = layer.backward(params, state, x, dy)
    np.testing.assert_allclose(dp["alpha"], ref_p["alpha"], rtol=1e-12)
    np.testing.assert_allclose(dx, ref_x, rtol=1e-12)


def test_prelu_default_slope_and_width_error(key):
    layer = L.PRelu()
    params, state, _ = layer.init(key, (2, 4))
    np.testing.assert_array_equal(params["alpha"], 0.25 * np.ones(4))   # PyTorch's default
    with pytest.raises(ValueError, match=r"PRelu: input last axis 3 .* 4 learned slopes"):
        layer.apply(params, state, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"PRelu"):
        layer.backward(params, state, jnp.ones((2, 3)), jnp.ones((2, 3)))


def test_plain_function_without_vjp_is_refused_by_name():
    with pytest.raises(TypeError, match=r"Activation: activation '<lambda>' has no \.vjp\(z, dy\)"):
        L.Activation(lambda z: A.gelu(z, True))
