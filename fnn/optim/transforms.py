"""The ``scale_by_*`` pieces optimizers are built from, each written from its update rule.

Each rule is written for one array and lifted over the tree with ``jax.tree.map``; each piece
keeps its own NamedTuple state. Notation: :math:`g_t` the incoming update (gradient) at step
:math:`t = 1, 2, \\dots`, :math:`u_t` the outgoing one; all operations are elementwise.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnn.optim.base import GradientTransformation, PyTree, check_structure, safe_increment

__all__ = [
    "TraceState", "trace", "ScaleByRssState", "scale_by_rss", "ScaleByRmsState", "scale_by_rms",
    "ScaleByStddevState", "scale_by_stddev", "ScaleByAdamState", "scale_by_adam",
    "scale_by_adamax", "ScaleByLionState", "scale_by_lion",
]


def _zeros(params: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, params)


def _full(params: PyTree, value: float) -> PyTree:
    return jax.tree.map(lambda p: jnp.full_like(p, value), params)


def _ema(g, m, decay, order=1):
    """:math:`(1-\\beta)\\,g^k + \\beta\\,m`: one exponential-moving-average step."""
    return (1 - decay) * (g ** order) + decay * m


def _debias(m, correction):
    """Adam's bias correction :math:`m / (1 - \\beta^t)`, divided in the moment's dtype."""
    return m / correction.astype(m.dtype)


class TraceState(NamedTuple):
    """The momentum buffer :math:`v`."""

    trace: PyTree


def trace(decay: float, nesterov: bool = False, *, ema: bool = False) -> GradientTransformation:
    """Momentum, heavy-ball or EMA form, optionally Nesterov.

    Heavy ball (``ema=False``, optax's ``trace``):
    :math:`v_t = \\beta v_{t-1} + g_t`, :math:`u_t = v_t` (Nesterov: :math:`u_t = g_t + \\beta v_t`).

    EMA (``ema=True``, the form in most lecture notes):
    :math:`v_t = \\beta v_{t-1} + (1-\\beta) g_t`, :math:`u_t = v_t`
    (Nesterov: :math:`u_t = \\beta v_t + (1-\\beta) g_t`). Same path as heavy ball with the
    learning rate scaled by :math:`1-\\beta`.

    Example::

        tx = chain(trace(0.9), scale_by_learning_rate(0.01))   # == sgd(0.01, momentum=0.9)
    """
    step = (lambda g, v: (1 - decay) * g + decay * v) if ema else (lambda g, v: g + decay * v)

    def init(params):
        return TraceState(trace=_zeros(params))

    def update(updates, state, params=None):
        check_structure("trace", updates, state.trace, "optimizer state")
        v = jax.tree.map(step, updates, state.trace)
        out = jax.tree.map(step, updates, v) if nesterov else v
        return out, TraceState(trace=v)

    return GradientTransformation(init, update)


class ScaleByRssState(NamedTuple):
    """The running sum of squared gradients :math:`G`."""

    sum_of_squares: PyTree


def scale_by_rss(initial_accumulator_value: float = 0.1, eps: float = 1e-7
                 ) -> GradientTransformation:
    """Adagrad: divide by the root of the summed squares (Duchi et al., 2011).

    :math:`G_t = G_{t-1} + g_t^2`, :math:`u_t = g_t / \\sqrt{G_t + \\epsilon}` (0 where
    :math:`G_t = 0`), :math:`G_0` = ``initial_accumulator_value``. As optax; PyTorch starts at
    :math:`G_0 = 0` and adds :math:`\\epsilon` outside the root.

    Example: ``chain(scale_by_rss(), scale_by_learning_rate(0.1))`` is ``adagrad(0.1)``.
    """
    def init(params):
        return ScaleByRssState(sum_of_squares=_full(params, initial_accumulator_value))

    def one(g, s):
        return jnp.where(s > 0, jax.lax.rsqrt(s + eps), 0.0) * g

    def update(updates, state, params=None):
        check_structure("scale_by_rss", updates, state.sum_of_squares, "optimizer state")
        s = jax.tree.map(lambda g, s: g * g + s, updates, state.sum_of_squares)
        return jax.tree.map(one, updates, s), ScaleByRssState(sum_of_squares=s)

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    """The EMA of squared gradients :math:`\\nu`."""

    nu: PyTree


def _rsqrt(x, eps, eps_in_sqrt):
    return jax.lax.rsqrt(x + eps) if eps_in_sqrt else 1 / (jnp.sqrt(x) + eps)


def scale_by_rms(decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
                 eps_in_sqrt: bool = True) -> GradientTransformation:
    """RMSprop (Tieleman & Hinton, 2012): divide by the RMS of recent gradients.

    :math:`\\nu_t = \\rho\\,\\nu_{t-1} + (1-\\rho)\\,g_t^2`,
    :math:`u_t = g_t / \\sqrt{\\nu_t + \\epsilon}` (``eps_in_sqrt``, as optax) or
    :math:`g_t / (\\sqrt{\\nu_t} + \\epsilon)` (as PyTorch). :math:`\\nu_0` = ``initial_scale``.

    Example: ``chain(scale_by_rms(0.9), scale_by_learning_rate(1e-3))`` is ``rmsprop(1e-3)``.
    """
    def init(params):
        return ScaleByRmsState(nu=_full(params, initial_scale))

    def update(updates, state, params=None):
        check_structure("scale_by_rms", updates, state.nu, "optimizer state")
        nu = jax.tree.map(lambda g, n: _ema(g, n, decay, 2), updates, state.nu)
        out = jax.tree.map(lambda g, n: _rsqrt(n, eps, eps_in_sqrt) * g, updates, nu)
        return out, ScaleByRmsState(nu=nu)

    return GradientTransformation(init, update)


class ScaleByStddevState(NamedTuple):
    """EMAs of the gradient :math:`\\mu` and of its square :math:`\\nu`."""

    mu: PyTree
    nu: PyTree


def scale_by_stddev(decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
                    eps_in_sqrt: bool = True) -> GradientTransformation:
    """Centered RMSprop (Graves, 2013): divide by a running standard deviation.

    :math:`\\mu_t = \\rho\\mu_{t-1} + (1-\\rho)g_t`, :math:`\\nu_t = \\rho\\nu_{t-1} + (1-\\rho)g_t^2`,
    :math:`u_t = g_t / \\sqrt{\\nu_t - \\mu_t^2 + \\epsilon}`.

    Example: ``chain(scale_by_stddev(), scale_by_learning_rate(1e-3))`` is
    ``rmsprop(1e-3, centered=True)``.
    """
    def init(params):
        return ScaleByStddevState(mu=_zeros(params), nu=_full(params, initial_scale))

    def update(updates, state, params=None):
        check_structure("scale_by_stddev", updates, state.mu, "optimizer state")
        mu = jax.tree.map(lambda g, m: _ema(g, m, decay), updates, state.mu)
        nu = jax.tree.map(lambda g, n: _ema(g, n, decay, 2), updates, state.nu)
        out = jax.tree.map(lambda g, m, n: _rsqrt(n - m * m, eps, eps_in_sqrt) * g,
                           updates, mu, nu)
        return out, ScaleByStddevState(mu=mu, nu=nu)

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    """Step count (int32) and the first and second moment EMAs."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                  *, nesterov: bool = False) -> GradientTransformation:
    """Adam (Kingma & Ba, 2015), or Nadam (Dozat, 2016) with ``nesterov=True``.

    :math:`m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t`, :math:`v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2`,
    :math:`\\hat m_t = m_t / (1-\\beta_1^t)`, :math:`\\hat v_t = v_t / (1-\\beta_2^t)`,
    :math:`u_t = \\hat m_t / (\\sqrt{\\hat v_t + \\epsilon_{root}} + \\epsilon)`.
    Nadam replaces :math:`\\hat m_t` by
    :math:`\\beta_1 m_t / (1-\\beta_1^{t+1}) + (1-\\beta_1) g_t / (1-\\beta_1^t)`.

    Example::

        tx = chain(scale_by_adam(), scale_by_learning_rate(1e-3))   # == adam(1e-3)
    """
    def init(params):
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=_zeros(params),
                                nu=_zeros(params))

    def update(updates, state, params=None):
        check_structure("scale_by_adam", updates, state.mu, "optimizer state")
        mu = jax.tree.map(lambda g, m: _ema(g, m, b1), updates, state.mu)
        nu = jax.tree.map(lambda g, n: _ema(g, n, b2, 2), updates, state.nu)
        t = safe_increment(state.count)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t  # bias corrections, scalars
        if nesterov:
            c1_next = 1 - b1 ** safe_increment(t)
            first = lambda g, m: b1 * _debias(m, c1_next) + (1 - b1) * _debias(g, c1)
        else:
            first = lambda g, m: _debias(m, c1)
        out = jax.tree.map(
            lambda g, m, n: first(g, m) / (jnp.sqrt(_debias(n, c2) + eps_root) + eps),
            updates, mu, nu)
        return out, ScaleByAdamState(count=t, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                    ) -> GradientTransformation:
    """Adamax (Kingma & Ba, 2015, sec. 7.1): Adam with an infinity-norm second moment.

    :math:`m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t`, :math:`v_t = \\max(|g_t| + \\epsilon, \\beta_2 v_{t-1})`,
    :math:`u_t = m_t / ((1-\\beta_1^t)\\, v_t)`. State: ``ScaleByAdamState``.

    Example: ``chain(scale_by_adamax(), scale_by_learning_rate(2e-3))`` is ``adamax(2e-3)``.
    """
    def init(params):
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=_zeros(params),
                                nu=_zeros(params))

    def update(updates, state, params=None):
        check_structure("scale_by_adamax", updates, state.mu, "optimizer state")
        t = safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: _ema(g, m, b1), updates, state.mu)
        nu = jax.tree.map(lambda g, n: jnp.maximum(jnp.abs(g) + eps, b2 * n), updates, state.nu)
        c1 = 1 - b1 ** t
        out = jax.tree.map(lambda m, n: _debias(m, c1) / n, mu, nu)
        return out, ScaleByAdamState(count=t, mu=mu, nu=nu)

    return GradientTransformation(init, update)


class ScaleByLionState(NamedTuple):
    """Step count (int32) and the momentum :math:`m`."""

    count: jax.Array
    mu: PyTree


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    :math:`u_t = \\operatorname{sign}(\\beta_1 m_{t-1} + (1-\\beta_1) g_t)`,
    :math:`m_t = \\beta_2 m_{t-1} + (1-\\beta_2) g_t`.

    Example: ``chain(scale_by_lion(), scale_by_learning_rate(1e-4))`` is
    ``lion(1e-4, weight_decay=0.0)``.
    """
    def init(params):
        return ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=_zeros(params))

    def update(updates, state, params=None):
        check_structure("scale_by_lion", updates, state.mu, "optimizer state")
        out = jax.tree.map(lambda g, m: jnp.sign(_ema(g, m, b1)), updates, state.mu)
        mu = jax.tree.map(lambda g, m: _ema(g, m, b2), updates, state.mu)
        return out, ScaleByLionState(count=safe_increment(state.count), mu=mu)

    return GradientTransformation(init, update)
