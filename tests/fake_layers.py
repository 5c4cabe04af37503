"""Small test layers and helpers shared by the combinator and core tests: fake layers with
per-call keywords (``Masked``, ``Scaled``), keys (``Noise``, ``Drop``), and ``check_backward``
(a layer's backward against ``jax.vjp`` in one compiled call)."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from fnn import layers
from fnn.core import Layer, from_backward

from helpers import assert_trees_close

K = jax.random.PRNGKey(0)



def np_init(key, shape, dtype):
    """A key-dependent initializer drawn by NumPy: a new shape costs no jax.random compile
    (those dominate this file's run time), and different keys still give different arrays."""
    seed = np.asarray(jax.random.key_data(key)).tolist()
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) / 2, dtype)


def Dense(n):
    return layers.Dense(n, w_init=np_init, b_init=np_init)


# --------------------------------------------------------------------------- fake layers

def keep_shape(key, input_shape):
    return {}, {}, tuple(input_shape)


def Masked() -> Layer:
    """Zeroes time steps at or past ``lengths`` (keyword): x (B, T, F), lengths (B,)."""
    def mask(x, lengths):
        return (jnp.arange(x.shape[1])[None, :] < lengths[:, None]).astype(x.dtype)[:, :, None]

    def apply(params, state, x, *, key=None, train=False, lengths):
        return x * mask(x, lengths), state

    def backward(params, state, x, dy, *, key=None, train=False, lengths):
        return {}, dy * mask(x, lengths)
    return from_backward(keep_shape, apply, backward, name="Masked", keywords={"lengths"})


def Scaled() -> Layer:
    """Multiplies example b by ``scale[b]`` (keyword): x (B, ...), scale (B,)."""
    def apply(params, state, x, *, key=None, train=False, scale):
        return x * scale.reshape((-1,) + (1,) * (x.ndim - 1)), state

    def backward(params, state, x, dy, *, key=None, train=False, scale):
        return {}, dy * scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return from_backward(keep_shape, apply, backward, name="Scaled", keywords={"scale"})


def key_hash(key, shape):
    """Pseudo-random uint32 bits from a key by integer hashing: key-dependent like jax.random,
    but without compiling threefry into every test program (that dominated the run time)."""
    k = jax.random.key_data(key).astype(jnp.uint32)
    i = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
    h = (i + k[0]) * jnp.uint32(0x9E3779B1) ^ (k[1] * jnp.uint32(0x85EBCA77))
    h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
    return h ^ (h >> 12)


def Noise() -> Layer:
    """Adds noise in [0, 1) drawn from its key (so tests can see which key it got)."""
    def apply(params, state, x, *, key=None, train=False):
        return x + (key_hash(key, x.shape) & 0xFFFF).astype(x.dtype) / 65536, state

    def backward(params, state, x, dy, *, key=None, train=False):
        return {}, dy
    return from_backward(keep_shape, apply, backward, name="Noise", stochastic=True)


def Drop() -> Layer:
    """Inverted dropout at rate 1/2; backward must see the mask of the forward pass."""
    def mask(key, x):
        return ((key_hash(key, x.shape) >> 7) & 1).astype(x.dtype) * 2

    def apply(params, state, x, *, key=None, train=False):
        if not train:
            return x, state
        if key is None:
            raise ValueError("Drop: train=True needs a key")
        return x * mask(key, x), state

    def backward(params, state, x, dy, *, key=None, train=False):
        return {}, (dy * mask(key, x) if train else dy)
    return from_backward(keep_shape, apply, backward, name="Drop", stochastic=True)


# --------------------------------------------------------------------------- helpers

def normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def shapes(t):
    """Shape of an array, or the nested tuple of shapes of a tuple of arrays / of shapes."""
    if hasattr(t, "shape"):
        return tuple(t.shape)
    return tuple(t) if all(isinstance(d, int) for d in t) else tuple(shapes(a) for a in t)


def check_backward(layer, x, **kw):
    """layer.backward against jax.vjp of layer.apply, in one compiled call (compiles dominate
    this file's run time); also checks init's inferred output shape. Returns (params, y)."""
    params, state, out = layer.init(K, x.shape)
    static = {k: v for k, v in kw.items() if isinstance(v, bool)}          # train=
    dynamic = {k: v for k, v in kw.items() if k not in static}

    def run(params, x, dy, dynamic):
        f = lambda p, x: layer.apply(p, state, x, **static, **dynamic)[0]
        y, vjp = jax.vjp(f, params, x)
        return y, layer.backward(params, state, x, dy, **static, **dynamic), vjp(dy)
    y_shape = jax.eval_shape(lambda p, x: layer.apply(p, state, x, **kw)[0], params, x)
    dy = jax.tree.map(lambda a: normal(a.shape, 7), y_shape)
    y, got, ref = jax.jit(run)(params, x, dy, dynamic)
    assert shapes(y) == shapes(out)
    assert_trees_close(got, ref, rtol=1e-10, atol=1e-12)
    return params, y


def np_dense(x, p):
    return np.asarray(x) @ np.asarray(p["w"]) + np.asarray(p["b"])
