"""The perceptron rule against a NumPy transcription of Rosenblatt's loop."""
import numpy as np
import pytest

from helpers import numpy_perceptron, xor_data

from fnn.perceptron import perceptron_fit, perceptron_predict


def separable(rng, n=60):
    x = rng.normal(size=(n, 3))
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 > 0).astype(np.int64)
    return x, y


@pytest.mark.parametrize("lr", [1.0, 0.1])
def test_matches_numpy_loop(rng, lr):
    x, y = separable(rng)
    params, _ = perceptron_fit(x, y, epochs=7, lr=lr)
    w, b = numpy_perceptron(x, y, 7, lr)
    np.testing.assert_allclose(params["w"], w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(params["b"], b, rtol=1e-12, atol=1e-12)


def test_converges_on_separable_data(rng):
    x, y = separable(rng)
    params, mistakes = perceptron_fit(x, y, epochs=200)
    assert int(mistakes[-1]) == 0
    assert np.array_equal(np.asarray(perceptron_predict(params, x)), y)


def test_cannot_learn_xor():
    x, y = xor_data(4, noise=0)                          # the truth table
    params, mistakes = perceptron_fit(x, y, epochs=100)
    assert int(mistakes[-1]) > 0
    assert np.mean(np.asarray(perceptron_predict(params, x)) == y) <= 0.75


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"perceptron_fit: expected x of shape \(n, features\)"):
        perceptron_fit(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"expected y of shape \(4,\), got \(4, 1\)"):
        perceptron_fit(np.zeros((4, 2)), np.zeros((4, 1)))
