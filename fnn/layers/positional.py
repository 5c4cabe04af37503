"""Positional information: sinusoidal (fixed), learned ``PositionalEmbedding``, rotary (RoPE).

Sinusoidal (Vaswani et al. 2017), added to the token features::

    PE[p, 2i] = sin(p / base^(2i/F)),   PE[p, 2i+1] = cos(p / base^(2i/F))

Rotary (Su et al. 2021), applied to queries and keys inside attention: each head's features are
split in halves ``(x₁, x₂)`` (GPT-NeoX / Hugging Face LLaMA layout; RoFormer and Meta's LLaMA pair
*interleaved* features, a fixed permutation of the same thing) and rotated by ``θ_i = p·base^(-2i/d)``::

    y₁ = x₁ cos θ − x₂ sin θ,   y₂ = x₂ cos θ + x₁ sin θ

a rotation, so its backward is the rotation by ``−θ``: ``dx₁ = dy₁ cos θ + dy₂ sin θ``,
``dx₂ = dy₂ cos θ − dy₁ sin θ``.

**Decoding.** Layers here take the keyword ``cache_len`` (see
``fnn.layers.multi_head_attention``): with it,
``state`` is a decoding state ``{"index": int32}`` (``{}`` starts a fresh one at 0), the input holds
the next positions ``index, index + 1, ...``, and the advanced state is returned.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fnn import initializers as inits
from fnn.core import Example, Layer, constructor, default_dtype, examples, from_backward, is_shape

__all__ = ["sinusoidal", "rope", "rope_backward", "check_room", "SinusoidalPositions",
           "PositionalEmbedding"]


def sinusoidal(positions, features: int, base: float = 10000.0, dtype=None):
    """Sinusoidal table: ``PE[p, 2i] = sin(p·ω_i)``, ``PE[p, 2i+1] = cos(p·ω_i)``, ``ω_i = base^(-2i/F)``.

    **Arguments:** ``positions``: integer array ``[...]``; ``features``: ``F``.
    **Returns:** ``[..., F]`` in ``dtype`` (default float dtype).
    """
    dtype = dtype or default_dtype()
    positions = jnp.asarray(positions)
    half = (features + 1) // 2
    omega = base ** (-2.0 * jnp.arange(half, dtype=dtype) / features)         # (half,)
    ang = positions[..., None].astype(dtype) * omega.reshape((1,) * positions.ndim + (half,))
    pe = jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1)                     # [..., half, 2]
    return pe.reshape(positions.shape + (2 * half,))[..., :features]


def _rope_angles(positions, d: int, base: float, dtype):
    """``(cos θ, sin θ)`` shaped ``[batch|1, time, 1, d/2]`` for ``positions: [time] | [batch, time]``."""
    positions = jnp.asarray(positions)
    if positions.ndim not in (1, 2):
        raise ValueError(f"rope: expected positions of shape (time,) or (batch, time), "
                         f"got shape {positions.shape}")
    pos = positions.reshape(positions.shape[0] if positions.ndim == 2 else 1,
                            positions.shape[-1], 1, 1)                      # (b|1, t, 1, 1)
    half = d // 2
    inv = base ** (-2.0 * jnp.arange(half, dtype=dtype) / d)                  # (half,)
    ang = pos.astype(dtype) * inv.reshape(1, 1, 1, half)                      # (b|1, t, 1, half)
    return jnp.cos(ang), jnp.sin(ang)


def _rope_check(x, positions):
    if not hasattr(x, "ndim") or x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: expected x of shape (batch, time, heads, head_dim) with an even "
                         f"head_dim, got shape {getattr(x, 'shape', type(x).__name__)}")
    p = jnp.shape(positions)
    if p[-1:] != (x.shape[1],) or (len(p) == 2 and p[0] not in (1, x.shape[0])):
        raise ValueError(f"rope: positions of shape {p} do not match x of shape {x.shape}; "
                         f"expected (time,) or (batch, time)")


def _rotate(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope(x, positions, base: float = 10000.0):
    """Rotary position embedding of ``x: [batch, time, heads, head_dim]`` at integer
    ``positions: [time]`` or ``[batch, time]`` (half-split layout, see the module docstring)."""
    _rope_check(x, positions)
    cos, sin = _rope_angles(positions, x.shape[-1], base, x.dtype)
    return _rotate(x, cos, sin)


def rope_backward(dy, positions, base: float = 10000.0):
    """VJP of :func:`rope`: the inverse rotation, ``dx = R(−θ)·dy``."""
    _rope_check(dy, positions)
    cos, sin = _rope_angles(positions, dy.shape[-1], base, dy.dtype)
    return _rotate(dy, cos, -sin)


# --------------------------------------------------------------------------- decoding helpers

def _raise_past(bad, index, n, capacity, name):
    if bad:
        raise ValueError(f"{name}: decoding past the end of the cache: position {int(index)} "
                         f"+ {int(n)} new > capacity {int(capacity)}")


def check_room(name: str, index, n: int, capacity: int):
    """Raise ``ValueError`` if writing ``n`` positions at ``index`` overflows ``capacity``.

    A concrete ``index`` is checked in Python; a traced one (under ``jit``) by a host callback
    taken only on overflow (``lax.cond``), which surfaces as a runtime error with the same message.
    """
    if n > capacity:
        raise ValueError(f"{name}: {n} new positions do not fit a cache of capacity {capacity}")
    if isinstance(index, jax.core.Tracer):      # the host is called only when it overflows
        jax.lax.cond(index + n > capacity, lambda i: jax.debug.callback(
            _raise_past, True, i, n, capacity, name), lambda i: None, index)
    else:
        _raise_past(int(index) + n > capacity, index, n, capacity, name)


def _decode_index(name, state, cache_len):
    """The decoding position held in ``state`` (``{}`` → 0)."""
    if not isinstance(cache_len, int) or cache_len < 1:
        raise ValueError(f"{name}: cache_len must be a positive int, got {cache_len!r}")
    if not state:
        return jnp.zeros((), jnp.int32)
    if "index" not in state:
        raise ValueError(f"{name}: decoding expects a state {{'index': ...}} or {{}}, "
                         f"got keys {sorted(state)}")
    return state["index"]


def _check_seq(name, x, features=None):
    if not hasattr(x, "ndim") or x.ndim != 3 or (features is not None and x.shape[-1] != features):
        want = f"(batch, time, {features})" if features else "(batch, time, features)"
        raise ValueError(f"{name}: expected input of shape {want}, "
                         f"got shape {getattr(x, 'shape', type(x).__name__)}")


def _no_decode_backward(name, cache_len):
    if cache_len is not None:
        raise ValueError(f"{name}: backward does not run in decoding mode (cache_len given)")


# --------------------------------------------------------------------------- layers

@examples(Example((2, 5, 4)), Example((2, 3, 7), (), {"base": 100.0}))
@constructor
def SinusoidalPositions(base: float = 10000.0) -> Layer:
    """Adds the fixed sinusoidal table: ``y[b, t] = x[b, t] + PE[t]`` (Vaswani et al. 2017).

    No params. ``[batch, time, features]`` → same. Backward: ``dx = dy``. Takes ``cache_len``
    (decoding: positions continue from ``state["index"]``).
    """
    name = "SinusoidalPositions"

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 3:
            raise ValueError(f"{name}: expected input shape (batch, time, features), "
                             f"got {input_shape}")
        return {}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False, cache_len=None):
        _check_seq(name, x)
        t = x.shape[1]
        if cache_len is None:
            return x + sinusoidal(jnp.arange(t), x.shape[2], base, x.dtype)[None], state
        index = _decode_index(name, state, cache_len)
        check_room(name, index, t, cache_len)
        pe = sinusoidal(index + jnp.arange(t), x.shape[2], base, x.dtype)     # (t, F)
        return x + pe[None], {"index": index + t}

    def backward(params, state, x, dy, *, key=None, train=False, cache_len=None):
        _check_seq(name, x)
        _no_decode_backward(name, cache_len)
        return {}, dy

    return from_backward(init, apply, backward, name=name, keywords={"cache_len"})


@examples(Example((2, 5, 4), (8,)), Example((3, 4, 2), (4,)))
@constructor
def PositionalEmbedding(max_len: int, *, w_init=None) -> Layer:
    """Learned absolute positions: ``y[b, t] = x[b, t] + w[t]`` (GPT-2's ``wpe``).

    **Params:** ``{"w": (max_len, features)}``, default ``N(0, 0.02²)``.
    ``[batch, time ≤ max_len, features]`` → same. Backward: ``dw[t] = Σ_b dy[b, t]`` for
    ``t < time`` (zero beyond), ``dx = dy``. Takes ``cache_len`` (decoding from ``state["index"]``).
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"PositionalEmbedding: max_len must be a positive int, got {max_len!r}")
    name = f"PositionalEmbedding({max_len})"
    w_init = w_init or inits.normal(0.02)

    def check(params, x):
        _check_seq(name, x, params["w"].shape[1])
        if x.shape[1] > max_len:
            raise ValueError(f"{name}: sequence length {x.shape[1]} exceeds max_len {max_len}")

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 3 or input_shape[1] > max_len:
            raise ValueError(f"{name}: expected input shape (batch, time <= {max_len}, features), "
                             f"got {input_shape}")
        return {"w": w_init(key, (max_len, input_shape[2]), default_dtype())}, {}, \
            tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False, cache_len=None):
        check(params, x)
        w, t = params["w"], x.shape[1]
        if cache_len is None:
            return x + w[:t][None], state
        index = _decode_index(name, state, cache_len)
        check_room(name, index, t, max_len)
        rows = jax.lax.dynamic_slice_in_dim(w, index, t, axis=0)                 # (t, F)
        return x + rows[None], {"index": index + t}

    def backward(params, state, x, dy, *, key=None, train=False, cache_len=None):
        check(params, x)
        _no_decode_backward(name, cache_len)
        w, t = params["w"], x.shape[1]
        dw = jnp.concatenate([jnp.sum(dy, axis=0), jnp.zeros((max_len - t, w.shape[1]), dy.dtype)])
        return {"w": dw}, dy

    return from_backward(init, apply, backward, name=name, keywords={"cache_len"})
