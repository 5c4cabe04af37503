"""fnn: neural networks as pure functions over parameter pytrees, for JAX.

Every layer is ``Layer(init, apply, backward)``; ``backward`` is hand-derived and checked
against ``jax.vjp``. See ``DESIGN.md`` and the README.
"""
from fnn import activations, initializers, layers, losses
from fnn.core import (Example, Layer, cast, count_params, examples, parallel, residual, serial,
                      stack, summary)

__version__ = "0.1.0"

__all__ = [
    "Layer", "Example", "examples", "serial", "parallel", "residual", "stack", "count_params",
    "summary", "cast", "activations", "initializers", "layers", "losses",
]
