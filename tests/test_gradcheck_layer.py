"""fnn.gradcheck.check_layer and check_model's input gradient: a wrong ``dx`` or ``dparams`` is
caught against jax.vjp and finite differences, naming the source and the leaf; correct layers
(one-input, tuple-input, with residuals, integer input) pass."""
import jax
import jax.numpy as jnp
import pytest

from fnn import losses
from fnn.combinators import serial
from fnn.gradcheck import GradcheckError, check_layer, check_model
from fnn.layers import LSTM, Add, Dense, Embedding, LayerNorm, Tanh


def wrong_dx(layer, factor=1.5):
    """``layer`` whose hand ``dx`` is scaled (a slip invisible to its own parameters)."""
    def bwd(params, state, res, dy, **kw):
        g, dx = layer.bwd(params, state, res, dy, **kw)
        return g, factor * dx
    return layer._replace(bwd=bwd)


def wrong_dparams(layer):
    """``layer`` whose hand bias gradient misses its batch sum."""
    def bwd(params, state, res, dy, **kw):
        g, dx = layer.bwd(params, state, res, dy, **kw)
        return {**g, "b": dy[0]}, dx
    return layer._replace(bwd=bwd)


X = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
Y = jax.random.normal(jax.random.PRNGKey(2), (5, 2))


def test_check_model_catches_a_wrong_dx_in_the_first_layer(key):
    """The parameter gradients of ``serial(bad, ...)`` are all right (nothing consumes the
    first layer's dx): only the input's rows can fail."""
    good = serial(Dense(4), Tanh(), Dense(2))
    p, s, _ = good.init(key, X.shape)
    assert check_model(good, losses.mse, p, s, X, Y).passed
    bad = serial(wrong_dx(Dense(4)), Tanh(), Dense(2))
    report = check_model(bad, losses.mse, p, s, X, Y, raise_on_fail=False)
    failed = {(r.source, r.leaf) for r in report.failures()}
    assert failed == {("fnn.backprop", "x")}
    with pytest.raises(GradcheckError, match=r"check_model: fnn.backprop gradient of leaf x "):
        check_model(bad, losses.mse, p, s, X, Y)


def test_check_model_skips_the_input_gradient_of_integer_inputs(key):
    model = serial(Embedding(7, 3), Dense(2))
    ids = jnp.array([[1, 2], [3, 6]])
    p, s, _ = model.init(key, ids.shape)
    report = check_model(model, losses.mse, p, s, ids, jnp.ones((2, 2, 2)))
    assert report.passed and all(r.leaf != "x" for r in report.rows)


@pytest.mark.parametrize("layer,shape", [
    (Dense(3), (4, 5)), (Tanh(), (4, 5)), (LayerNorm(), (2, 3, 4)), (LSTM(3), (2, 4, 2)),
], ids=["Dense", "Tanh", "LayerNorm", "LSTM"])
def test_check_layer_passes_correct_layers(layer, shape, key):
    params, state, _ = layer.init(key, shape)
    x = jax.random.normal(jax.random.PRNGKey(3), shape)
    report = check_layer(layer, params, state, x)
    assert report.passed
    assert {r.source for r in report.rows} == {"backward", "bwd(fwd)", "jax.vjp"}
    assert any(r.leaf == "x" for r in report.rows)


def test_check_layer_handles_tuple_inputs_and_integer_inputs(key):
    xs = (X, 2 * X)
    p, s, _ = Add().init(key, (X.shape, X.shape))
    report = check_layer(Add(), p, s, xs)
    assert report.passed and {r.leaf for r in report.rows} == {"x[0]", "x[1]"}
    emb = Embedding(7, 3)
    p, s, _ = emb.init(key, (2, 2))
    report = check_layer(emb, p, s, jnp.array([[1, 2], [3, 6]]))
    assert report.passed and all(r.leaf != "x" for r in report.rows)


def test_check_layer_catches_a_wrong_dx(key):
    layer = Dense(3)
    params, state, _ = layer.init(key, X.shape)
    report = check_layer(wrong_dx(layer), params, state, X, raise_on_fail=False)
    assert {(r.source, r.leaf) for r in report.failures()} == {("backward", "x"), ("bwd(fwd)", "x")}
    with pytest.raises(GradcheckError, match=r"check_layer: (backward|bwd\(fwd\)) gradient of "
                                             r"leaf x "):
        check_layer(wrong_dx(layer), params, state, X)


def test_check_layer_catches_wrong_dparams_naming_the_leaf(key):
    layer = Dense(3)
    params, state, _ = layer.init(key, X.shape)
    with pytest.raises(GradcheckError, match=r"gradient of leaf \['b'\]"):
        check_layer(wrong_dparams(layer), params, state, X)


def test_check_layer_catches_a_backward_that_differs_from_bwd(key):
    """``backward`` is derived from fwd/bwd, but a layer may override it: both are checked."""
    layer = Dense(3)
    params, state, _ = layer.init(key, X.shape)

    class Broken(type(layer)):
        def backward(self, params, state, x, dy, **kw):
            g, dx = super().backward(params, state, x, dy, **kw)
            return {**g, "w": -g["w"]}, dx
    bad = Broken(*layer)
    report = check_layer(bad, params, state, X, raise_on_fail=False)
    assert {(r.source, r.leaf) for r in report.failures()} == {("backward", "['w']")}
