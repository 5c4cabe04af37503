"""NaN propagation: a NaN in an activation's or a layer's input is never swallowed.

Every activation (function, ``.grad``, ``.vjp``) is held against its ``jax.nn`` counterpart:
where the reference gives NaN, fnn gives NaN. fnn's own hand derivatives go further: a NaN input
or a NaN ``dy`` entry gives a NaN derivative there (``relu``'s ``where(z > 0, ...)`` used to turn
a NaN into a finite 0 or slope). Every layer in ``fnn.layers.__all__`` (through its
``@examples``) is checked in tests/test_layers_sweep.py's ``test_backward_matches_vjp``, in the
same compiled call as its gradient check: a NaN input entry makes the output non-finite, and the
hand backward is non-finite wherever ``jax.vjp`` of ``apply`` is.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import activations as A


ALPHA = np.array([0.1, 0.2, 0.3, -0.5, 2.0])

# name -> (fnn function, kwargs, jax.numpy / jax.nn reference)
REFERENCES = {
    "step": (A.step, {}, lambda z: jnp.heaviside(z, 0.0)),
    "identity": (A.identity, {}, lambda z: z),
    "sigmoid": (A.sigmoid, {}, jax.nn.sigmoid),
    "tanh": (A.tanh, {}, jnp.tanh),
    "relu": (A.relu, {}, jax.nn.relu),
    "leaky_relu": (A.leaky_relu, {"alpha": 0.2}, lambda z: jax.nn.leaky_relu(z, 0.2)),
    "elu": (A.elu, {"alpha": 0.5}, lambda z: jax.nn.elu(z, 0.5)),
    "selu": (A.selu, {}, jax.nn.selu),
    "gelu": (A.gelu, {}, lambda z: jax.nn.gelu(z, approximate=False)),
    "gelu_tanh": (A.gelu_tanh, {}, lambda z: jax.nn.gelu(z, approximate=True)),
    "quick_gelu": (A.quick_gelu, {}, lambda z: z * jax.nn.sigmoid(1.702 * z)),
    "swish": (A.swish, {}, jax.nn.swish),
    "silu": (A.silu, {}, jax.nn.silu),
    "softplus": (A.softplus, {}, jax.nn.softplus),
    "softmax": (A.softmax, {}, jax.nn.softmax),
    "log_softmax": (A.log_softmax, {}, jax.nn.log_softmax),
    "prelu": (A.prelu, {"alpha": ALPHA}, lambda z: jnp.where(z >= 0, z, ALPHA[None, :] * z)),
}
# the derivative depends on z (identity's is 1 everywhere: its NaN shows in the output)
ELEMENTWISE = [n for n in REFERENCES if hasattr(REFERENCES[n][0], "grad") and n != "identity"]

# one NaN per row, at every position, next to negative, zero and positive entries
Z = np.resize([-2.0, -0.5, 0.0, 0.7, 3.0], (5, 5))
np.fill_diagonal(Z, np.nan)
DY = np.resize([0.3, -1.2, 0.8, 2.0, -0.4, 1.1], (5, 5))


def test_every_activation_function_is_swept():
    functions = {n for n in A.__all__ if n[:1].islower() and n != "check_activation"}
    assert functions == set(REFERENCES)


def nans(a):
    return np.isnan(np.asarray(a))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_activation_keeps_nan_as_jax_nn_does(name):
    fn, kw, ref = REFERENCES[name]
    z, dy = jnp.asarray(Z), jnp.asarray(DY)
    ours, ref_y = fn(z, **kw), ref(z)
    assert nans(ref_y).any()
    assert (nans(ours) >= nans(ref_y)).all(), f"{name}({Z}) = {ours}; jax gives {ref_y}"
    ref_dx = jax.vjp(ref, z)[1](dy)[0]
    dx = fn.vjp(z, dy, **kw)
    assert (nans(dx) >= nans(ref_dx)).all(), f"{name}.vjp swallows a NaN jax.vjp keeps"
    assert name == "identity" or nans(dx).any(), f"{name}.vjp: a NaN input gives no NaN in dx"


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_derivatives_keep_nan_input_and_nan_dy(name):
    """Stronger than jax.nn (whose relu derivative at NaN is 0): the hand derivative at a NaN
    input is NaN, and a NaN ``dy`` entry gives a NaN ``dx`` entry (``dy·0`` is NaN)."""
    fn, kw, _ = REFERENCES[name]
    z = jnp.asarray(Z)
    assert (nans(fn.grad(z, **kw)) == nans(Z)).all()
    assert (nans(fn.vjp(z, jnp.asarray(DY), **kw)) == nans(Z)).all()
    finite_z = jnp.asarray(np.nan_to_num(Z, nan=-1.0))          # the NaN moved into dy
    assert (nans(fn.vjp(finite_z, jnp.asarray(np.where(nans(Z), np.nan, DY)), **kw))
            == nans(Z)).all()


def test_relu_of_nan_is_nan_and_of_minus_inf_is_zero():
    y = A.relu(jnp.array([np.nan, -np.inf, np.inf, -1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(np.asarray(y), [np.nan, 0, np.inf, 0, 0, 2])


def test_prelu_layer_backward_keeps_nan():
    from fnn import layers as L
    layer = L.PRelu()
    params, state, _ = layer.init(jax.random.PRNGKey(0), (5, 5))
    dp, dx = layer.backward(params, state, jnp.asarray(Z), jnp.asarray(DY))
    assert (nans(dx) == nans(Z)).all() and nans(dp["alpha"]).all()
