"""Parameter-shape checks the parameterised layers share.

Shapes are static under ``jit``, so these checks run once, at trace time, and cost nothing in
the compiled step. They catch a parameter tree that does not belong to the layer — a
``Dense(64)`` checkpoint loaded without ``like=`` into a ``Dense(32)`` model, a transposed
kernel — where JAX would otherwise broadcast, or compute something of the wrong width.
"""
from __future__ import annotations

__all__ = ["check_param_shapes"]


def check_param_shapes(name: str, params, expected: dict) -> None:
    """Raise unless ``params`` has exactly the keys of ``expected``, each of that shape.

    **Arguments:** ``name``: the layer, as shown in errors (``"Dense(5)"``); ``params``: the
    layer's parameter dict; ``expected``: ``{key: shape}`` inferred from the input and the
    constructor's arguments.
    **Raises:** ``TypeError`` if ``params`` is not a dict; ``ValueError`` naming the layer, the
    parameter, the expected and the actual shape, or the missing/unexpected keys.

    >>> import jax.numpy as jnp
    >>> check_param_shapes("Dense(5)", {"w": jnp.ones((3, 5)), "b": jnp.ones(4)},
    ...                    {"w": (3, 5), "b": (5,)})
    Traceback (most recent call last):
    ValueError: Dense(5): parameter 'b' has shape (4,), expected (5,) for this input
    """
    if not isinstance(params, dict):
        raise TypeError(f"{name}: expected a dict of parameters with keys {sorted(expected)}, "
                        f"got {type(params).__name__}")
    missing, extra = set(expected) - set(params), set(params) - set(expected)
    if missing or extra:
        raise ValueError(f"{name}: expected parameters {sorted(expected)}, got {sorted(params)}"
                         + (f" (missing {sorted(missing)})" if missing else "")
                         + (f" (unexpected {sorted(extra)})" if extra else ""))
    for k, shape in expected.items():
        got = tuple(getattr(params[k], "shape", ()))
        if got != tuple(shape):
            raise ValueError(f"{name}: parameter {k!r} has shape {got}, expected "
                             f"{tuple(shape)} for this input")
