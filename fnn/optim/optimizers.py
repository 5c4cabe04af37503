"""Public optimizers: ``chain(scale_by_*(...), scale_by_learning_rate(learning_rate))``.

Every ``learning_rate`` is a float or a schedule ``step -> value`` (``fnn.optim.schedules``).
Defaults follow optax, so ``fnn.optim.adam(1e-3)`` takes the same steps as ``optax.adam(1e-3)``.
:math:`\\eta` is the learning rate and :math:`\\theta` the parameters; ``params + updates`` is
the new :math:`\\theta`.

Example::

    opt = fnn.optim.adam(1e-3)
    opt_state = opt.init(params)
    grads = jax.grad(loss)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = fnn.optim.apply_updates(params, updates)
"""
from __future__ import annotations

from fnn.optim.base import GradientTransformation, add_decayed_weights, chain, identity
from fnn.optim.rates import scale_by_learning_rate
from fnn.optim.transforms import (scale_by_adam, scale_by_adamax, scale_by_lion, scale_by_rms,
                                  scale_by_rss, scale_by_stddev, trace)

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "adamax", "nadam", "lion"]


def sgd(learning_rate, momentum: float = 0.0, nesterov: bool = False, *,
        ema: bool = False) -> GradientTransformation:
    """Stochastic gradient descent, with optional (Nesterov) momentum.

    Plain: :math:`\\theta \\leftarrow \\theta - \\eta g`. With momentum :math:`\\beta > 0`,
    heavy ball (``ema=False``, as optax and PyTorch) :math:`v \\leftarrow \\beta v + g`, or the
    EMA form (``ema=True``) :math:`v \\leftarrow \\beta v + (1-\\beta) g`; then
    :math:`\\theta \\leftarrow \\theta - \\eta v` (see ``trace`` for Nesterov).

    Example::

        opt = sgd(0.1, momentum=0.9)
    """
    if momentum == 0.0 and nesterov:
        raise ValueError("sgd: nesterov=True needs momentum > 0")
    first = trace(momentum, nesterov, ema=ema) if momentum else identity()
    return chain(first, scale_by_learning_rate(learning_rate, name="sgd"))


def adagrad(learning_rate, initial_accumulator_value: float = 0.1, eps: float = 1e-7
            ) -> GradientTransformation:
    """Adagrad: :math:`G \\leftarrow G + g^2`, :math:`\\theta \\leftarrow \\theta - \\eta g/\\sqrt{G+\\epsilon}`.

    See ``scale_by_rss``. Example: ``opt = adagrad(0.1)``.
    """
    return chain(scale_by_rss(initial_accumulator_value, eps),
                 scale_by_learning_rate(learning_rate, name="adagrad"))


def rmsprop(learning_rate, decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
            eps_in_sqrt: bool = True, centered: bool = False, momentum: float = 0.0,
            nesterov: bool = False) -> GradientTransformation:
    """RMSprop, optionally centered and with momentum (as optax).

    :math:`\\nu \\leftarrow \\rho\\nu + (1-\\rho)g^2`, :math:`s = -\\eta\\, g/\\sqrt{\\nu + \\epsilon}`
    (centered: :math:`\\sqrt{\\nu - \\mu^2 + \\epsilon}`). With momentum :math:`\\beta`:
    :math:`b \\leftarrow \\beta b + s`, :math:`\\theta \\leftarrow \\theta + b` (the learning
    rate enters before the momentum buffer, as optax; PyTorch scales the buffer instead, the
    same steps for a constant rate).

    Example::

        opt = rmsprop(1e-3, centered=True, momentum=0.9)
    """
    rms = scale_by_stddev if centered else scale_by_rms
    return chain(rms(decay, eps, initial_scale, eps_in_sqrt),
                 scale_by_learning_rate(learning_rate, name="rmsprop"),
                 trace(momentum, nesterov) if momentum else identity())


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 0.0, *, nesterov: bool = False) -> GradientTransformation:
    """Adam: :math:`\\theta \\leftarrow \\theta - \\eta\\,\\hat m/(\\sqrt{\\hat v} + \\epsilon)`.

    See ``scale_by_adam`` for :math:`\\hat m, \\hat v`. Example: ``opt = adam(1e-3)``.
    """
    return chain(scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate, name="adam"))


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0, weight_decay=1e-4, mask=None, *,
          nesterov: bool = False) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay.

    :math:`\\theta \\leftarrow \\theta - \\eta\\,(\\hat m/(\\sqrt{\\hat v} + \\epsilon) + \\lambda\\theta)`
    on the leaves ``mask`` selects (a bool pytree or a predicate on the key path).

    Example::

        opt = adamw(1e-3, weight_decay=1e-2, mask=not_named("b", "scale", "offset"))
    """
    return chain(scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov),
                 add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate, name="adamw"))


def adamax(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
           ) -> GradientTransformation:
    """Adamax: :math:`\\theta \\leftarrow \\theta - \\eta\\, m / ((1-\\beta_1^t)\\, v_\\infty)`.

    See ``scale_by_adamax``. Example: ``opt = adamax(2e-3)``.
    """
    return chain(scale_by_adamax(b1, b2, eps),
                 scale_by_learning_rate(learning_rate, name="adamax"))


def nadam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0) -> GradientTransformation:
    """Nadam: Adam with a Nesterov look-ahead first moment (``scale_by_adam(nesterov=True)``).

    Example: ``opt = nadam(1e-3)``.
    """
    return adam(learning_rate, b1, b2, eps, eps_root, nesterov=True)


def lion(learning_rate, b1: float = 0.9, b2: float = 0.99, weight_decay=1e-3, mask=None
         ) -> GradientTransformation:
    """Lion: :math:`\\theta \\leftarrow \\theta - \\eta\\,(\\operatorname{sign}(\\beta_1 m + (1-\\beta_1) g) + \\lambda\\theta)`.

    Decoupled weight decay :math:`\\lambda` defaults to 1e-3 as in optax; use a learning rate
    3-10x smaller than Adam's. Example: ``opt = lion(1e-4)``.
    """
    return chain(scale_by_lion(b1, b2), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate, name="lion"))
