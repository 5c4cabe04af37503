"""Weight initializers: ``init(key, shape, dtype) -> array``.

Fan-in and fan-out follow the kernel layouts fnn uses: a dense kernel is ``(in, out)``; a
convolution kernel is ``(*spatial, in, out)``, whose fans count the receptive field
(``fan_in = in · prod(spatial)``, ``fan_out = out · prod(spatial)``).

The variance-scaling family (Glorot, He, LeCun) draws with variance ``scale / fan`` — truncated
normals are not used, so ``*_normal`` is a plain normal with exactly that variance (PyTorch's
convention; Flax/JAX default to a truncated normal rescaled to the same variance).

>>> w = he_normal()(jax.random.PRNGKey(0), (784, 128), jnp.float32)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fnn.core import default_dtype

__all__ = [
    "zeros", "ones", "constant", "normal", "uniform", "fans", "variance_scaling",
    "glorot_normal", "glorot_uniform", "xavier_normal", "xavier_uniform",
    "he_normal", "he_uniform", "kaiming_normal", "kaiming_uniform",
    "lecun_normal", "lecun_uniform", "orthogonal",
]


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel: ``(in, out)`` or ``(*spatial, in, out)``.

    A vector (a bias) has ``fan_in = fan_out = len``; a scalar has fans of 1.
    """
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _dtype(dtype):
    return default_dtype() if dtype is None else dtype


def zeros(key=None, shape=(), dtype=None):
    """All zeros."""
    return jnp.zeros(shape, _dtype(dtype))


def ones(key=None, shape=(), dtype=None):
    """All ones."""
    return jnp.ones(shape, _dtype(dtype))


def constant(value):
    """An initializer filling with ``value``."""
    def init(key, shape, dtype=None):
        return jnp.full(shape, value, _dtype(dtype))
    return init


def normal(stddev: float = 1e-2):
    """``N(0, stddev²)`` (the lesson's ``randn · 0.01`` is ``normal(0.01)``)."""
    def init(key, shape, dtype=None):
        return stddev * jax.random.normal(key, shape, _dtype(dtype))
    return init


def uniform(scale: float = 1e-2):
    """``U(-scale, scale)``."""
    def init(key, shape, dtype=None):
        return jax.random.uniform(key, shape, _dtype(dtype), -scale, scale)
    return init


def variance_scaling(scale: float, mode: str, distribution: str):
    """Draw with variance ``scale / n`` where ``n`` is ``fan_in``, ``fan_out`` or their mean.

    ``distribution`` is ``"normal"`` (stddev ``√(scale/n)``) or ``"uniform"`` (on
    ``±√(3·scale/n)``, which has the same variance).
    """
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"variance_scaling: mode must be fan_in, fan_out or fan_avg, got {mode!r}")
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"variance_scaling: distribution must be normal or uniform, "
                         f"got {distribution!r}")

    def init(key, shape, dtype=None):
        fan_in, fan_out = fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        var = scale / max(n, 1)
        if distribution == "normal":
            return math.sqrt(var) * jax.random.normal(key, shape, _dtype(dtype))
        limit = math.sqrt(3 * var)
        return jax.random.uniform(key, shape, _dtype(dtype), -limit, limit)
    return init


def glorot_normal():
    """Glorot/Xavier normal: variance ``2 / (fan_in + fan_out)`` (for tanh and sigmoid)."""
    return variance_scaling(1.0, "fan_avg", "normal")


def glorot_uniform():
    """Glorot/Xavier uniform on ``±√(6 / (fan_in + fan_out))``."""
    return variance_scaling(1.0, "fan_avg", "uniform")


def he_normal():
    """He/Kaiming normal: variance ``2 / fan_in`` (for ReLU networks)."""
    return variance_scaling(2.0, "fan_in", "normal")


def he_uniform():
    """He/Kaiming uniform on ``±√(6 / fan_in)``."""
    return variance_scaling(2.0, "fan_in", "uniform")


def lecun_normal():
    """LeCun normal: variance ``1 / fan_in`` (for SELU networks)."""
    return variance_scaling(1.0, "fan_in", "normal")


def lecun_uniform():
    """LeCun uniform on ``±√(3 / fan_in)``."""
    return variance_scaling(1.0, "fan_in", "uniform")


xavier_normal = glorot_normal
"""Glorot's initializer under PyTorch's name (``nn.init.xavier_normal_``)."""
xavier_uniform = glorot_uniform
"""Glorot's initializer under PyTorch's name (``nn.init.xavier_uniform_``)."""
kaiming_normal = he_normal
"""He's initializer under PyTorch's name (``nn.init.kaiming_normal_``)."""
kaiming_uniform = he_uniform
"""He's initializer under PyTorch's name (``nn.init.kaiming_uniform_``)."""


def orthogonal(gain: float = 1.0):
    """A (semi-)orthogonal matrix times ``gain`` (Saxe et al., 2014).

    For a kernel of shape ``(*rest, cols)`` the matrix ``(prod(rest), cols)`` has orthonormal
    columns when ``rows >= cols`` (``Qᵀ Q = I``) and orthonormal rows otherwise. QR of a Gaussian
    matrix, with the signs of ``R``'s diagonal folded into ``Q`` so the draw is uniform.
    """
    def init(key, shape, dtype=None):
        if len(shape) < 2:
            raise ValueError(f"orthogonal: needs a shape of rank >= 2, got {tuple(shape)}")
        cols = shape[-1]
        rows = math.prod(shape[:-1])
        dtype = _dtype(dtype)
        work = jnp.promote_types(dtype, jnp.float32)     # LAPACK has no QR in bfloat16/float16
        a = jax.random.normal(key, (max(rows, cols), min(rows, cols)), work)
        q, r = jnp.linalg.qr(a)
        q = q * jnp.sign(jnp.diagonal(r))[None, :]
        if rows < cols:
            q = q.T
        return (gain * q).reshape(shape).astype(dtype)
    return init
