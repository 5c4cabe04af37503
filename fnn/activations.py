"""Activation functions, each with its hand-derived derivative, and their layer forms.

Every activation ``f`` is a plain function of an array ``z`` and carries:

- ``f.grad(z, ...)``: the elementwise derivative ``f'(z)`` (elementwise activations only);
- ``f.vjp(z, dy, ...)``: the vector-Jacobian product ``dy · ∂f/∂z``, for every activation
  (softmax and log_softmax couple the last axis, so they have ``vjp`` but no ``grad``).

All are stable for ``|z|`` up to 1e4: no overflow, no NaN.

>>> z = jnp.array([-2.0, 0.0, 2.0])
>>> print(sigmoid(z).round(4), sigmoid.grad(z).round(4))    # σ(z) and σ'(z) = σ(z)(1 - σ(z))
[0.1192 0.5 0.8808] [0.105 0.25 0.105]
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fnn.core import Example, Layer, constructor, default_dtype, examples, from_backward

__all__ = [
    "step", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu",
    "gelu_tanh", "quick_gelu", "swish", "silu", "softplus", "softmax", "log_softmax", "prelu",
    "Activation", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Gelu", "QuickGelu",
    "Swish", "Softplus", "Softmax", "LogSoftmax", "PRelu", "check_activation",
]


def _keep_nan(z, g):
    """``g`` with ``z``'s NaNs put back: a piecewise derivative chosen by ``z > 0`` would
    otherwise turn a NaN input into a finite slope (and hide it from the backward)."""
    return jnp.where(jnp.isnan(z), z, g)


def _elementwise(grad):
    """Attach ``grad`` and the elementwise ``vjp`` to an activation."""
    def attach(f):
        f.grad = grad
        f.vjp = lambda z, dy, *a, **k: dy * grad(z, *a, **k)
        return f
    return attach


# --------------------------------------------------------------------------- functions

@_elementwise(lambda z: _keep_nan(z, jnp.zeros_like(z)))
def step(z):
    """Heaviside step (the perceptron's threshold): ``1`` where ``z > 0`` else ``0``; NaN stays
    NaN (as ``jnp.heaviside``).

    Its derivative is zero almost everywhere, which is why the perceptron has its own rule.
    """
    return _keep_nan(z, (z > 0).astype(z.dtype))


@_elementwise(lambda z: jnp.ones_like(z))
def identity(z):
    """``f(z) = z``; ``f'(z) = 1``."""
    return z


def _sigmoid_grad(z):
    s = sigmoid(z)
    return s * (1 - s)


@_elementwise(_sigmoid_grad)
def sigmoid(z):
    """Logistic sigmoid ``σ(z) = 1 / (1 + e^{-z})``; ``σ'(z) = σ(z)(1 - σ(z))``.

    Computed as ``e^{min(z,0)} / (1 + e^{-|z|})`` so neither branch overflows.
    """
    e = jnp.exp(-jnp.abs(z))
    return jnp.where(z >= 0, 1 / (1 + e), e / (1 + e))


@_elementwise(lambda z: 1 - jnp.tanh(z) ** 2)
def tanh(z):
    """Hyperbolic tangent; ``tanh'(z) = 1 - tanh(z)²``."""
    return jnp.tanh(z)


@_elementwise(lambda z: _keep_nan(z, (z > 0).astype(z.dtype)))
def relu(z):
    """``max(0, z)``; derivative ``1`` for ``z > 0`` and ``0`` otherwise (``0`` at ``z = 0``,
    as in PyTorch and ``jax.nn.relu``; written as a ``where`` so autodiff agrees at 0).
    ``relu(nan)`` is NaN, as ``jax.nn.relu`` and ``torch.relu``, and so is its derivative."""
    return _keep_nan(z, jnp.where(z > 0, z, jnp.zeros_like(z)))


@_elementwise(lambda z, alpha=0.01: _keep_nan(z, jnp.where(z > 0, 1.0, alpha).astype(z.dtype)))
def leaky_relu(z, alpha=0.01):
    """``z`` for ``z > 0``, else ``alpha·z``; derivative ``1`` or ``alpha``."""
    return jnp.where(z > 0, z, alpha * z)


@_elementwise(lambda z, alpha=1.0: jnp.where(z > 0, 1.0, alpha * jnp.exp(jnp.minimum(z, 0)))
              .astype(z.dtype))
def elu(z, alpha=1.0):
    """``z`` for ``z > 0``, else ``alpha·(e^z - 1)``; derivative ``1`` or ``alpha·e^z``."""
    return jnp.where(z > 0, z, alpha * jnp.expm1(jnp.minimum(z, 0)))


SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


@_elementwise(lambda z: SELU_SCALE * elu.grad(z, SELU_ALPHA))
def selu(z):
    """Scaled ELU (Klambauer et al., 2017): ``λ·elu(z, α)`` with the self-normalizing
    constants ``λ ≈ 1.0507``, ``α ≈ 1.6733``."""
    return SELU_SCALE * elu(z, SELU_ALPHA)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _gelu_grad(z, approximate=False):
    if approximate:
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z ** 3)
        t = jnp.tanh(u)
        du = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z ** 2)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t ** 2) * du
    cdf = 0.5 * (1 + jax.lax.erf(z / math.sqrt(2)))
    pdf = jnp.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


@_elementwise(_gelu_grad)
def gelu(z, approximate=False):
    """Gaussian error linear unit ``z·Φ(z)`` (Hendrycks & Gimpel, 2016).

    Exact: ``Φ(z) = (1 + erf(z/√2))/2``, derivative ``Φ(z) + z·φ(z)``. With
    ``approximate=True``: ``z/2·(1 + tanh(√(2/π)(z + 0.044715 z³)))`` (GPT-2's form).
    """
    if approximate:
        return 0.5 * z * (1 + jnp.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z ** 3)))
    return 0.5 * z * (1 + jax.lax.erf(z / math.sqrt(2)))


@_elementwise(lambda z: _gelu_grad(z, approximate=True))
def gelu_tanh(z):
    """The tanh-approximate GELU, GPT-2's ``gelu_new`` (PyTorch ``GELU(approximate="tanh")``):
    ``z/2·(1 + tanh(√(2/π)(z + 0.044715 z³)))``; ``gelu(z, approximate=True)`` as a function of
    ``z`` alone, to pass as ``activation=``. Derivative ``(1 + t)/2 + z/2·(1 - t²)·√(2/π)(1 +
    3·0.044715 z²)`` with ``t`` the tanh."""
    return gelu(z, approximate=True)


def _quick_gelu_grad(z):
    s = sigmoid(1.702 * z)
    return s + 1.702 * z * s * (1 - s)


@_elementwise(_quick_gelu_grad)
def quick_gelu(z):
    """Quick GELU ``z·σ(1.702 z)`` (CLIP's ``QuickGELU``, Hendrycks & Gimpel's sigmoid
    approximation); derivative ``σ(1.702z) + 1.702·z·σ(1.702z)(1 - σ(1.702z))``."""
    return z * sigmoid(1.702 * z)


def _swish_grad(z):
    s = sigmoid(z)
    return s + z * s * (1 - s)


@_elementwise(_swish_grad)
def swish(z):
    """Swish / SiLU ``z·σ(z)``; derivative ``σ(z) + z·σ(z)(1 - σ(z))``."""
    return z * sigmoid(z)


silu = swish


@_elementwise(lambda z: sigmoid(z))
def softplus(z):
    """``log(1 + e^z)``, computed as ``max(z, 0) + log1p(e^{-|z|})``; derivative ``σ(z)``."""
    return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def softmax(z, axis=-1):
    """``softmax(z)_i = e^{z_i - max z} / Σ_j e^{z_j - max z}`` along ``axis``.

    ``vjp``: ``s ⊙ (dy - Σ_j dy_j s_j)``.
    """
    e = jnp.exp(z - jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True)))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def log_softmax(z, axis=-1):
    """``z - logsumexp(z)`` along ``axis``, with the max subtracted first.

    ``vjp``: ``dy - softmax(z) · Σ_j dy_j``.
    """
    shifted = z - jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


def _softmax_vjp(z, dy, axis=-1):
    s = softmax(z, axis)
    return s * (dy - jnp.sum(dy * s, axis=axis, keepdims=True))


def _log_softmax_vjp(z, dy, axis=-1):
    return dy - softmax(z, axis) * jnp.sum(dy, axis=axis, keepdims=True)


softmax.vjp = _softmax_vjp
log_softmax.vjp = _log_softmax_vjp


def _prelu_grad(z, alpha):
    return _keep_nan(z, jnp.where(z > 0, 1.0, jnp.broadcast_to(alpha, z.shape)).astype(z.dtype))


@_elementwise(_prelu_grad)
def prelu(z, alpha):
    """Parametric ReLU (He et al., 2015): ``z`` for ``z > 0``, else ``alpha·z``, where
    ``alpha`` (shape ``(features,)``, broadcast over the last axis) is learned.
    ``grad``/``vjp`` are with respect to ``z`` (``1`` or ``alpha``); ``PRelu`` adds ``dalpha``."""
    a = jnp.broadcast_to(alpha, z.shape)
    return jnp.where(z > 0, z, a * z)


# --------------------------------------------------------------------------- layer forms

def check_activation(fn, where: str):
    """``fn`` if it carries the hand-derived ``.vjp(z, dy)`` an fnn backward needs, else a
    ``TypeError`` naming ``where`` (the layer taking ``activation=``), what is missing and the
    ways to supply it. ``MLP``, ``GatedMLP``, ``TransformerBlock``, ``GPT`` and ``Activation``
    call it when they are built."""
    if callable(fn) and callable(getattr(fn, "vjp", None)):
        return fn
    what = getattr(fn, "__name__", None) or repr(fn)
    raise TypeError(
        f"{where}: activation {what!r} has no .vjp(z, dy), the hand-derived derivative the "
        f"backward needs. Pass an fnn.activations function (gelu, gelu_tanh, quick_gelu, swish/"
        f"silu, relu, tanh, ...), or attach one to yours: f.vjp = lambda z, dy: dy * f_prime(z)")


@constructor
def Activation(fn, name: str | None = None, **fn_kwargs) -> Layer:
    """A parameter-free layer applying ``fn`` (any activation above) elementwise.

    Backward: ``dx = fn.vjp(x, dy)``; a function without ``.vjp`` raises ``TypeError``.
    """
    check_activation(fn, "Activation")
    name = name or getattr(fn, "__name__", "activation")

    def init(key, input_shape):
        return {}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        return fn(x, **fn_kwargs), state

    def backward(params, state, x, dy, *, key=None, train=False):
        return {}, fn.vjp(x, dy, **fn_kwargs)

    return from_backward(init, apply, backward, name=name)


_EX = Example((3, 5))


@examples(_EX)
@constructor
def Relu() -> Layer:
    """Layer form of :func:`relu`."""
    return Activation(relu, "Relu")


@examples(_EX)
@constructor
def Sigmoid() -> Layer:
    """Layer form of :func:`sigmoid`."""
    return Activation(sigmoid, "Sigmoid")


@examples(_EX)
@constructor
def Tanh() -> Layer:
    """Layer form of :func:`tanh`."""
    return Activation(tanh, "Tanh")


@examples(_EX, Example((3, 5), (0.2,)))
@constructor
def LeakyRelu(alpha: float = 0.01) -> Layer:
    """Layer form of :func:`leaky_relu` with slope ``alpha`` for negative inputs."""
    return Activation(leaky_relu, "LeakyRelu", alpha=alpha)


@examples(_EX, Example((3, 5), (0.5,)))
@constructor
def Elu(alpha: float = 1.0) -> Layer:
    """Layer form of :func:`elu`."""
    return Activation(elu, "Elu", alpha=alpha)


@examples(_EX)
@constructor
def Selu() -> Layer:
    """Layer form of :func:`selu`."""
    return Activation(selu, "Selu")


@examples(_EX, Example((3, 5), (), {"approximate": True}))
@constructor
def Gelu(approximate: bool = False) -> Layer:
    """Layer form of :func:`gelu` (exact by default, as PyTorch; Flax defaults to tanh;
    ``approximate=True`` is :func:`gelu_tanh`, GPT-2's ``gelu_new``)."""
    return Activation(gelu, "Gelu", approximate=approximate)


@examples(_EX)
@constructor
def QuickGelu() -> Layer:
    """Layer form of :func:`quick_gelu` (``x·σ(1.702x)``)."""
    return Activation(quick_gelu, "QuickGelu")


@examples(_EX)
@constructor
def Swish() -> Layer:
    """Layer form of :func:`swish` (SiLU)."""
    return Activation(swish, "Swish")


@examples(_EX)
@constructor
def Softplus() -> Layer:
    """Layer form of :func:`softplus`."""
    return Activation(softplus, "Softplus")


@examples(_EX)
@constructor
def Softmax() -> Layer:
    """Layer form of :func:`softmax` over the last axis."""
    return Activation(softmax, "Softmax")


@examples(_EX)
@constructor
def LogSoftmax() -> Layer:
    """Layer form of :func:`log_softmax` over the last axis."""
    return Activation(log_softmax, "LogSoftmax")


@examples(Example((3, 5)), Example((2, 4, 3), (), {"init": 0.1}))
@constructor
def PRelu(init: float = 0.25) -> Layer:
    """Parametric ReLU with a learned slope per feature (last axis), ``params = {"alpha":
    (features,)}``, initialised to ``init`` (0.25, as PyTorch).

    Backward: ``dx = dy`` where ``x > 0`` else ``alpha·dy``; ``dalpha = Σ dy·x`` over ``x ≤ 0``.
    """

    def init_fn(key, input_shape):
        return {"alpha": jnp.full((input_shape[-1],), init, default_dtype())}, {}, tuple(input_shape)

    def _check(params, x):
        if x.shape[-1] != params["alpha"].shape[0]:
            raise ValueError(f"PRelu: input last axis {x.shape[-1]} does not match the "
                             f"{params['alpha'].shape[0]} learned slopes; x shape {x.shape}")

    def apply(params, state, x, *, key=None, train=False):
        _check(params, x)
        return prelu(x, params["alpha"]), state

    def backward(params, state, x, dy, *, key=None, train=False):
        _check(params, x)
        dx = prelu.vjp(x, dy, params["alpha"])                 # NaN in x stays NaN in dx
        dalpha = jnp.sum(jnp.where(x > 0, 0, dy * x).reshape(-1, x.shape[-1]), axis=0)
        return {"alpha": dalpha}, dx

    return from_backward(init_fn, apply, backward, name="PRelu")
