"""Layer constructors: every public name here is a function returning a ``fnn.Layer``.

The test suite sweeps ``__all__``: each CamelCase constructor must carry ``@examples(...)``.
"""
from fnn.activations import (Activation, Elu, Gelu, LeakyRelu, LogSoftmax, PRelu, Relu, Selu,
                             Sigmoid, Softmax, Softplus, Swish, Tanh)
from fnn.core import parallel, residual, serial, stack
from fnn.layers.dense import Dense, Embedding, Flatten

__all__ = [
    "Activation", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Gelu", "Swish",
    "Softplus", "Softmax", "LogSoftmax", "PRelu",
    "Dense", "Flatten", "Embedding",
    "serial", "parallel", "residual", "stack",
]
