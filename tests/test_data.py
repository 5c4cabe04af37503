"""fnn.data: the minibatch iterator, the digits split and the synthetic sets, checked against
their definitions."""
import jax
import numpy as np
import pytest

from fnn import data


def _ids(batches):
    return np.concatenate([b[1] for b in batches])


def test_batches_cover_every_example_once_per_epoch(key):
    x = np.arange(23 * 2).reshape(23, 2)
    ids = np.arange(23)
    epochs = [list(data.batches((x, ids), 5, key=jax.random.fold_in(key, e))) for e in range(2)]
    for bs in epochs:
        assert [len(b[0]) for b in bs] == [5, 5, 5, 5, 3]
        assert sorted(_ids(bs)) == list(range(23))
        for xb, ib in bs:                                # rows stay paired with their labels
            np.testing.assert_array_equal(xb, x[ib])
    assert not np.array_equal(_ids(epochs[0]), _ids(epochs[1]))   # a new order each epoch
    dropped = list(data.batches((x, ids), 5, key=key, drop_last=True))
    assert len(dropped) == 4 == data.num_batches(23, 5, drop_last=True)
    assert len(set(_ids(dropped))) == 20
    plain = list(data.batches((x, ids), 5, shuffle=False))
    np.testing.assert_array_equal(_ids(plain), ids)
    assert data.num_batches(23, 5) == 5


def test_batches_errors():
    with pytest.raises(ValueError, match=r"same leading \(example\) axis, got shapes "
                                         r"\[\(3, 2\), \(4,\)\]"):
        next(data.batches((np.ones((3, 2)), np.ones(4)), 2, shuffle=False))
    with pytest.raises(ValueError, match="shuffle=True needs a key"):
        next(data.batches((np.ones(3),), 2))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        next(data.batches((np.ones(3),), 0, shuffle=False))


def test_split_is_a_partition():
    x, y = np.arange(10.0)[:, None], np.arange(10)
    (xa, ya), (xb, yb) = data.split((x, y), 0.3, seed=1)
    assert len(yb) == 3 and sorted(np.concatenate([ya, yb])) == list(range(10))
    np.testing.assert_array_equal(xa[:, 0], ya)
    with pytest.raises(ValueError, match=r"test_fraction must lie in \(0, 1\)"):
        data.split((x, y), 1.5)


def test_digits_fixed_stratified_split():
    sk = pytest.importorskip("sklearn.datasets").load_digits()
    (xtr, ytr), (xte, yte) = data.load_digits()
    assert xtr.shape == (1437, 64) and xte.shape == (360, 64) and xtr.dtype == np.float32
    assert ytr.dtype == np.int32 and 0.0 <= xtr.min() and xtr.max() <= 1.0
    # train + test is exactly the whole set, pixels divided by 16
    def rows(x, y):
        table = np.column_stack([np.asarray(x, np.float64), y])
        return table[np.lexsort(table.T[::-1])]
    np.testing.assert_array_equal(rows(16 * np.vstack([xtr, xte]), np.concatenate([ytr, yte])),
                                  rows(sk.data, sk.target))
    np.testing.assert_allclose(np.bincount(yte) / 360, np.bincount(sk.target) / 1797, atol=0.01)
    (xi, _), (xi_te, yi_te) = data.load_digits(image=True)
    np.testing.assert_array_equal(xi_te.reshape(360, 64), xte)     # same split, NHWC
    assert xi.shape == (1437, 8, 8, 1) and np.array_equal(yi_te, yte)


def test_xor_truth_table_and_noisy_corners():
    x, y = data.xor()
    np.testing.assert_array_equal(x, [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(y, [0, 1, 1, 0])
    x, y = data.xor(400, noise=0.05, seed=3)
    corner = np.rint(x).astype(int)                     # noise 0.05 never crosses 0.5
    np.testing.assert_array_equal(y, corner[:, 0] ^ corner[:, 1])
    assert 0.03 < np.std(x - corner) < 0.07 and set(np.unique(y)) == {0, 1}


def test_two_spirals_follow_their_equation():
    x, y = data.two_spirals(300, noise=0.0, turns=1.5, seed=0)
    assert x.shape == (300, 2) and np.bincount(y).tolist() == [150, 150]
    r = np.hypot(x[:, 0], x[:, 1])
    theta = 2 * np.pi * 1.5 * r + np.pi * y             # θ = 2π·turns·r (+π for class 1)
    np.testing.assert_allclose(np.cos(theta), x[:, 0] / r, atol=1e-5)
    np.testing.assert_allclose(np.sin(theta), x[:, 1] / r, atol=1e-5)
    x2, _ = data.two_spirals(300, noise=0.0, turns=1.5, seed=0)
    np.testing.assert_array_equal(x, x2)                # deterministic by seed


def test_noisy_sine():
    x, y = data.noisy_sine(500, noise=0.0)
    assert x.shape == y.shape == (500, 1) and np.all(np.abs(x) <= np.pi)
    np.testing.assert_allclose(y, np.sin(x), atol=1e-6)
    x, y = data.noisy_sine(4000, noise=0.2, seed=1)
    assert abs(np.std(y - np.sin(x)) - 0.2) < 0.01
