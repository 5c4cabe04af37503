"""Merges of parallel branches: ``Add`` and ``Multiply`` take the tuple a ``parallel`` returns.

::

    serial(parallel(F, downsample), Add(), Relu())            # ResNet projection shortcut
    serial(parallel(serial(Dense(h), Swish()), Dense(h)), Multiply(), Dense(d))   # SwiGLU

(Keras's ``Add`` and ``Multiply``; ``parallel(..., concat=True)`` is the third merge.) Both take
two or more arrays of one shape and return one array of that shape; their residual is the
tuple of inputs.
"""
from __future__ import annotations

from fnn.core import Example, Layer, constructor, examples, from_backward, is_shape

__all__ = ["Add", "Multiply"]


def _check_shapes(name: str, shapes):
    if is_shape(shapes) or not isinstance(shapes, (tuple, list)) or len(shapes) < 2 \
            or not all(is_shape(s) for s in shapes):
        raise ValueError(f"{name}: expected a tuple of two or more input shapes (what "
                         f"parallel(...) outputs), got {shapes}")
    if len({tuple(s) for s in shapes}) != 1:
        raise ValueError(f"{name}: the inputs must have one shape, got {[tuple(s) for s in shapes]}")
    return tuple(shapes[0])


def _check_inputs(name: str, xs):
    if not isinstance(xs, (tuple, list)) or len(xs) < 2 or not all(hasattr(x, "shape") for x in xs):
        raise ValueError(f"{name}: expected a tuple of two or more arrays (what parallel(...) "
                         f"returns), got {type(xs).__name__}")
    _check_shapes(name, [tuple(x.shape) for x in xs])


def _merge(name: str, op, grads) -> Layer:
    def init(key, input_shape):
        return {}, {}, _check_shapes(name, input_shape)

    def apply(params, state, xs, *, key=None, train=False):
        _check_inputs(name, xs)
        return op(xs), state

    def backward(params, state, xs, dy, *, key=None, train=False):
        _check_inputs(name, xs)
        return {}, type(xs)(grads(xs, dy))

    return from_backward(init, apply, backward, name=name)


def _sum(xs):
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    return y


def _product(xs):
    y = xs[0]
    for x in xs[1:]:
        y = y * x
    return y


_EXAMPLES = (Example(((3, 5), (3, 5))), Example(((2, 3, 4), (2, 3, 4), (2, 3, 4))))


@examples(*_EXAMPLES)
@constructor
def Add() -> Layer:
    """Sum of the branches: ``y = x₁ + x₂ + … + xₙ`` (Keras ``Add``), for ``(x₁, …, xₙ)`` of
    one shape. Backward: every input receives ``dy``.

    >>> from fnn.core import output_shape
    >>> from fnn.layers import Dense, parallel, serial
    >>> output_shape(serial(parallel(Dense(4), Dense(4)), Add()), (2, 3))
    (2, 4)
    """
    return _merge("Add", _sum, lambda xs, dy: [dy] * len(xs))


@examples(*_EXAMPLES)
@constructor
def Multiply() -> Layer:
    """Elementwise product of the branches: ``y = x₁ ⊙ x₂ ⊙ … ⊙ xₙ`` (Keras ``Multiply``; the
    gate of SwiGLU/GeGLU), for ``(x₁, …, xₙ)`` of one shape. Backward: ``dxᵢ = dy ⊙ ∏_{j≠i}
    xⱼ`` (products of the others, no division, so a zero input is fine)."""
    def grads(xs, dy):
        return [dy * _product([x for j, x in enumerate(xs) if j != i]) if len(xs) > 2
                else dy * xs[1 - i] for i in range(len(xs))]
    return _merge("Multiply", _product, grads)

