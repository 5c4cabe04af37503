"""fnn: neural networks as pure functions over parameter pytrees, for JAX.

Every layer is ``Layer(init, apply, backward)``; ``backward`` is hand-derived and checked
against ``jax.vjp``. See ``docs/design.md`` and the README.
"""
from fnn import (activations, augment, backprop, checkpoint, checks, data, debug, gradcheck,
                 initializers, layers, losses, models, optim, precision, regularizers, sharding,
                 torch_weights, train)
from fnn.core import (Example, Layer, cast, count_params, examples, parallel, residual, serial,
                      stack, summary)

__version__ = "0.1.0"

__all__ = [
    "Layer", "Example", "examples", "serial", "parallel", "residual", "stack", "count_params",
    "summary", "cast", "activations", "augment", "backprop", "checkpoint", "checks", "data",
    "debug", "gradcheck", "initializers", "layers", "losses", "models", "optim", "precision",
    "regularizers", "sharding", "torch_weights", "train",
]
