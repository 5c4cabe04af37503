"""Data: a minibatch iterator over arrays, the digits that scikit-learn ships, small synthetic sets.

A data set is a tuple of arrays sharing their leading (example) axis, usually ``(x, target)``.
Everything here is deterministic given its ``seed``/``key`` and returns NumPy arrays; nothing
is downloaded.

>>> (x_train, y_train), (x_test, y_test) = load_digits()
>>> x_train.shape, x_test.shape
((1437, 64), (360, 64))
>>> for xb, yb in batches((x_train, y_train), 500, key=jax.random.PRNGKey(0)):
...     print(xb.shape, yb.shape)
(500, 64) (500,)
(500, 64) (500,)
(437, 64) (437,)
"""
from __future__ import annotations

import math
from typing import Iterator

import jax
import numpy as np

__all__ = ["num_examples", "batches", "num_batches", "split", "load_digits", "xor",
           "two_spirals", "noisy_sine"]


def num_examples(data, name: str = "data") -> int:
    """The shared leading size of every array in ``data``; ``ValueError`` if they disagree."""
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError(f"{name}: expected a tuple of arrays, got no arrays")
    sizes = [np.shape(a)[0] if np.ndim(a) else None for a in leaves]
    if None in sizes or len(set(sizes)) != 1:
        shapes = [tuple(np.shape(a)) for a in leaves]
        raise ValueError(f"{name}: every array needs the same leading (example) axis, "
                         f"got shapes {shapes}")
    return sizes[0]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many minibatches :func:`batches` yields for ``n`` examples."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batches(data, batch_size: int, *, key=None, shuffle: bool = True,
            drop_last: bool = False) -> Iterator:
    """Yield minibatches of ``data`` (a pytree of arrays with a shared leading axis).

    One pass covers every example exactly once (``drop_last=True`` leaves out the last
    ``n % batch_size``). With ``shuffle`` the order is a permutation drawn from ``key``
    (``jax.random.permutation``; pass a new key each epoch), else the stored order.

    >>> x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
    >>> for epoch in range(2):                      # a new permutation each epoch
    ...     key = jax.random.fold_in(jax.random.PRNGKey(0), epoch)
    ...     print(sorted(int(i) for _, yb in batches((x, y), 2, key=key) for i in yb))
    [0, 1, 2, 3, 4]
    [0, 1, 2, 3, 4]
    """
    n = num_examples(data, "batches")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batches: batch_size must be a positive int, got {batch_size!r}")
    if shuffle and key is None:
        raise ValueError("batches: shuffle=True needs a key (or pass shuffle=False)")
    order = np.asarray(jax.random.permutation(key, n)) if shuffle else np.arange(n)
    for i in range(num_batches(n, batch_size, drop_last)):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield jax.tree.map(lambda a: np.asarray(a)[idx], data)


def split(data, test_fraction: float, *, seed: int = 0):
    """Split ``data`` into ``(train, test)`` at random (a NumPy permutation from ``seed``)."""
    n = num_examples(data, "split")
    if not 0 < test_fraction < 1:
        raise ValueError(f"split: test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    pick = lambda idx: jax.tree.map(lambda a: np.asarray(a)[idx], data)
    return pick(order[n_test:]), pick(order[:n_test])


# --------------------------------------------------------------------------- digits

def load_digits(*, image: bool = False, test_fraction: float = 0.2, seed: int = 0,
                dtype=np.float32):
    """scikit-learn's 8×8 handwritten digits (1797 images, 10 classes), with a fixed split.

    Pixels (0..16) are divided by 16 into ``[0, 1]``. The split is scikit-learn's
    ``train_test_split(test_size=0.2, random_state=0, stratify=labels)``: 1437 training and
    360 test examples with the class proportions of the whole set.

    **Returns:** ``((x_train, y_train), (x_test, y_test))``; ``x: [n, 64]`` or, with
    ``image=True``, ``[n, 8, 8, 1]`` (NHWC); ``y: [n]`` int32 labels.
    """
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # an optional extra
        raise ImportError("fnn.data.load_digits needs scikit-learn: "
                          "pip install 'fnn[examples]'") from e
    bunch = _load()
    x = (bunch.data / 16.0).astype(dtype)
    y = bunch.target.astype(np.int32)
    if image:
        x = x.reshape(-1, 8, 8, 1)                      # (n, h, w, channels)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    return (x_tr, y_tr), (x_te, y_te)


# --------------------------------------------------------------------------- synthetic

def xor(n: int = 4, *, noise: float = 0.0, seed: int = 0, dtype=np.float32):
    """The XOR problem: points near the corners of the unit square, label ``x1 XOR x2``.

    ``n=4, noise=0`` is the truth table ``(0,0)→0, (0,1)→1, (1,0)→1, (1,1)→0`` in that order;
    otherwise ``n`` corners drawn uniformly, each moved by Gaussian noise of std ``noise``.
    **Returns:** ``(x: [n, 2], y: [n] int32)``.
    """
    rng = np.random.default_rng(seed)
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    which = np.arange(4) if n == 4 and noise == 0 else rng.integers(0, 4, size=n)
    x = corners[which] + noise * rng.standard_normal((len(which), 2))
    y = corners[which, 0] ^ corners[which, 1]
    return x.astype(dtype), y.astype(np.int32)


def two_spirals(n: int = 200, *, noise: float = 0.03, turns: float = 1.5, seed: int = 0,
                dtype=np.float32):
    """Two interleaved spirals (``n`` points, half per class): radius ``r = t``, angle
    ``θ = 2π·turns·t`` for ``t ∈ (0, 1]``, the second spiral rotated by π; Gaussian noise of std
    ``noise`` on each coordinate. **Returns:** ``(x: [n, 2], y: [n] int32)``."""
    rng = np.random.default_rng(seed)
    half = n // 2
    t = np.sqrt(rng.uniform(0.0, 1.0, size=n)) * 0.95 + 0.05
    label = (np.arange(n) >= n - half).astype(np.int32)
    theta = 2 * np.pi * turns * t + np.pi * label
    x = np.stack([t * np.cos(theta), t * np.sin(theta)], axis=1)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(dtype), label


def noisy_sine(n: int = 200, *, noise: float = 0.1, seed: int = 0, dtype=np.float32):
    """Regression: ``y = sin(x) + ε``, ``x ~ U(-π, π)``, ``ε ~ N(0, noise²)``.

    **Returns:** ``(x: [n, 1], y: [n, 1])``.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-np.pi, np.pi, size=(n, 1))
    y = np.sin(x) + noise * rng.standard_normal((n, 1))
    return x.astype(dtype), y.astype(dtype)
