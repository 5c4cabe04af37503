"""Initializers: empirical mean/variance of a large draw within 5% of theory (dense and conv
kernels, receptive field counted), normal vs uniform shape, orthogonality, dtypes, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import initializers as I

DENSE = (400, 300)           # fan_in 400, fan_out 300 (120k draws)
CONV = (3, 3, 32, 64)        # fan_in 3·3·32 = 288, fan_out 3·3·64 = 576 (18k draws)
CONV1D = (5, 64, 96)         # fan_in 320, fan_out 480 (31k draws)


def theory_var(name, shape):
    """The variance each initializer promises, from its definition (fans computed here)."""
    receptive = math.prod(shape[:-2])
    fi, fo = shape[-2] * receptive, shape[-1] * receptive
    return {"normal(0.05)": 0.05 ** 2, "uniform(0.2)": 0.2 ** 2 / 3,
            "glorot_normal": 2 / (fi + fo), "glorot_uniform": 2 / (fi + fo),
            "he_normal": 2 / fi, "he_uniform": 2 / fi,
            "lecun_normal": 1 / fi, "lecun_uniform": 1 / fi}[name]


INITS = {"normal(0.05)": I.normal(0.05), "uniform(0.2)": I.uniform(0.2),
         "glorot_normal": I.glorot_normal(), "glorot_uniform": I.glorot_uniform(),
         "he_normal": I.he_normal(), "he_uniform": I.he_uniform(),
         "lecun_normal": I.lecun_normal(), "lecun_uniform": I.lecun_uniform()}


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv2d"])
@pytest.mark.parametrize("name", list(INITS))
def test_mean_and_variance_match_theory(name, shape):
    w = np.asarray(INITS[name](jax.random.PRNGKey(1), shape, jnp.float64))
    assert w.shape == shape and w.dtype == np.float64
    var = theory_var(name, shape)
    assert abs(w.mean()) < 0.05 * math.sqrt(var), (w.mean(), var)
    assert abs(w.var() / var - 1) < 0.05, (w.var(), var)
    frac = np.mean(np.abs(w) < math.sqrt(var))      # P(|w| < σ): 0.683 normal, 0.577 uniform
    if "uniform" in name:
        limit = math.sqrt(3 * var)
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
        assert abs(frac - 1 / math.sqrt(3)) < 0.02
    else:
        assert abs(frac - math.erf(1 / math.sqrt(2))) < 0.02


def test_aliases():
    assert I.xavier_normal is I.glorot_normal and I.xavier_uniform is I.glorot_uniform
    assert I.kaiming_normal is I.he_normal and I.kaiming_uniform is I.he_uniform


@pytest.mark.parametrize("shape,expected", [((400, 300), (400, 300)), ((3, 3, 32, 64), (288, 576)),
                                            ((5, 64, 96), (320, 480)), ((7,), (7, 7)), ((), (1, 1))])
def test_fans(shape, expected):
    assert I.fans(shape) == expected


@pytest.mark.parametrize("mode,scale", [("fan_in", 3.0), ("fan_out", 0.5), ("fan_avg", 1.0)])
def test_variance_scaling_modes(mode, scale):
    w = I.variance_scaling(scale, mode, "normal")(jax.random.PRNGKey(2), CONV, jnp.float64)
    n = {"fan_in": 288, "fan_out": 576, "fan_avg": (288 + 576) / 2}[mode]
    assert abs(float(jnp.var(w)) / (scale / n) - 1) < 0.05


def test_variance_scaling_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"variance_scaling: mode must be .* got 'fan_sum'"):
        I.variance_scaling(1.0, "fan_sum", "normal")
    with pytest.raises(ValueError, match=r"variance_scaling: distribution must be .* got 'laplace'"):
        I.variance_scaling(1.0, "fan_in", "laplace")


# --------------------------------------------------------------------------- orthogonal

# every shape but the square one draws an (8, 4) Gaussian, so they share one compile
@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (5, 5), (2, 2, 2, 4), (1, 2, 4, 8)],
                         ids=["tall", "wide", "square", "conv-tall", "conv-wide"])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_orthogonal(shape, gain):
    w = np.asarray(I.orthogonal(gain)(jax.random.PRNGKey(3), shape, jnp.float64))
    assert w.shape == shape
    m = w.reshape(-1, shape[-1])                     # (prod(rest), cols)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    np.testing.assert_allclose(gram, gain ** 2 * np.eye(min(m.shape)), atol=1e-12)


def test_orthogonal_float32_and_differs_by_key():
    q = I.orthogonal()(jax.random.PRNGKey(0), (8, 4), jnp.float32)
    assert q.dtype == jnp.float32
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
    q2 = I.orthogonal()(jax.random.PRNGKey(1), (8, 4), jnp.float32)
    assert not np.allclose(q, q2)


def test_orthogonal_rejects_vectors():
    with pytest.raises(ValueError, match=r"orthogonal: needs a shape of rank >= 2, got \(5,\)"):
        I.orthogonal()(jax.random.PRNGKey(0), (5,), jnp.float64)


# --------------------------------------------------------------------------- constants, dtypes

def test_constant_initializers():
    k = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(I.zeros(k, (2, 3), jnp.float64), np.zeros((2, 3)))
    np.testing.assert_array_equal(I.ones(k, (2, 3), jnp.float64), np.ones((2, 3)))
    np.testing.assert_array_equal(I.constant(0.3)(k, (4,), jnp.float64), np.full(4, 0.3))


ALL = dict(INITS, zeros=I.zeros, ones=I.ones, constant=I.constant(2.0), orthogonal=I.orthogonal())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, None])
@pytest.mark.parametrize("name", list(ALL))
def test_dtype_respected(name, dtype):
    w = ALL[name](jax.random.PRNGKey(0), (8, 4), dtype)
    assert w.shape == (8, 4) and bool(jnp.all(jnp.isfinite(w)))
    assert w.dtype == (jnp.float64 if dtype is None else dtype)   # None: the default (x64 on)


@pytest.mark.parametrize("name", list(INITS))
def test_deterministic_in_key(name):
    f = lambda k: INITS[name](k, (8, 4), jnp.float64)
    a, b, c = f(jax.random.PRNGKey(5)), f(jax.random.PRNGKey(5)), f(jax.random.PRNGKey(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
