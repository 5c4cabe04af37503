"""fnn: neural networks as pure functions over parameter pytrees, for JAX.

Every layer is ``Layer(init, apply, fwd, bwd)``: a forward pass and a hand-derived backward from
its residuals, checked against ``jax.vjp``. See ``docs/design.md`` and the README.
"""
from fnn import (activations, augment, backprop, checkpoint, checks, compilation, data, debug,
                 gradcheck, initializers, kernels, layers, losses, models, optim, precision,
                 regularizers, sharding, torch_weights, train, tuning)
from fnn.combinators import parallel, residual, serial, stack, tied
from fnn.core import (Example, Layer, cast, constructor, count_params, examples, from_backward,
                      summary)

__version__ = "0.2.0"

__all__ = [
    "Layer", "from_backward", "constructor", "Example", "examples", "serial", "parallel",
    "residual", "stack", "tied", "count_params", "summary", "cast", "activations", "augment",
    "backprop", "checkpoint", "checks", "compilation", "data", "debug", "gradcheck",
    "initializers", "kernels", "layers", "losses", "models", "optim", "precision", "regularizers",
    "sharding", "torch_weights", "train", "tuning",
]
