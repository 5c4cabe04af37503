"""The shared test helpers can fail: ``assert_trees_close`` catches each kind of difference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close, xor_data


def test_assert_trees_close_has_numpys_allclose_meaning():
    want = {"w": np.array([1.0, 1e-6, 0.0]), "b": (np.float64(2.0), np.array(3))}
    assert_trees_close(want, want, rtol=0, atol=0)
    near = {"w": np.array([1.0 + 1e-9, 1e-6, 1e-12]), "b": (2.0, jnp.asarray(3.0))}
    assert_trees_close(near, want, rtol=1e-8, atol=1e-11)
    with pytest.raises(AssertionError, match=r"\['w'\]: 1 of 3 entries differ .* at \(2,\)"):
        assert_trees_close(near, want, rtol=1e-8, atol=1e-13)        # 1e-12 > atol at a zero
    with pytest.raises(AssertionError, match=r"\['w'\]: 1 of 3 entries .* at \(0,\)"):
        assert_trees_close(near, want, rtol=1e-10, atol=1e-11)       # 1e-9 > rtol·1
    small = {"w": np.array([1.0, 1.1e-6, 0.0]), "b": want["b"]}
    with pytest.raises(AssertionError, match=r"at \(1,\)"):           # relative to each entry,
        assert_trees_close(small, want, rtol=1e-3, atol=0)           # not to the leaf's largest


def test_assert_trees_close_checks_structure_shapes_and_special_values():
    with pytest.raises(AssertionError, match="structure"):
        assert_trees_close({"a": 1.0}, {"b": 1.0}, rtol=1, atol=1)
    with pytest.raises(AssertionError, match=r"shape \(2,\) != \(1, 2\)"):
        assert_trees_close([np.zeros(2)], [np.zeros((1, 2))], rtol=1, atol=1)
    nan = np.array([np.nan, np.inf])
    assert_trees_close(nan, nan.copy(), rtol=0, atol=0)
    for other in ([np.nan, 1e300], [0.0, np.inf], [np.nan, -np.inf]):
        with pytest.raises(AssertionError, match="NaN or inf"):
            assert_trees_close(np.array(other), nan, rtol=1, atol=1e308)
    k = jax.random.key(0)
    assert_trees_close({"k": k}, {"k": jax.random.key(0)}, rtol=0, atol=0)
    with pytest.raises(AssertionError):
        assert_trees_close({"k": k}, {"k": jax.random.key(1)}, rtol=0, atol=0)


def test_xor_data():
    x, y = xor_data(40, seed=1)
    assert x.shape == (40, 2) and y.shape == (40,) and x.dtype == jnp.float64
    corner = np.round(np.asarray(x)).astype(int)                  # noise 0.1: the nearest corner
    np.testing.assert_array_equal(np.asarray(y), corner[:, 0] ^ corner[:, 1])
    table = xor_data(4, noise=0)                                  # noise 0: the truth table
    assert_trees_close(table, (np.array([[0, 0], [0, 1], [1, 0], [1, 1]]), np.array([0, 1, 1, 0])),
                       rtol=0, atol=0)
