"""Learning-rate schedules: pure, jittable functions ``step -> value``.

``step`` counts optimizer updates from 0 (an int or an int32 array, traced or not); the value
is a float array. Boundaries are inclusive on the right piece: at ``step == boundary`` the next
piece has begun (as optax). Pass a schedule wherever a learning rate goes::

    lr = warmup_cosine(0.0, 1e-3, warmup_steps=100, decay_steps=1000)
    opt = fnn.optim.adam(lr)
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp

from fnn.optim.rates import check_rate

Schedule = Callable

__all__ = ["constant", "linear", "step_decay", "exponential_decay", "cosine_annealing",
           "warmup_cosine", "one_cycle", "polynomial", "piecewise_constant", "join"]


def _float(step):
    return jnp.asarray(step, dtype=jnp.zeros(()).dtype)


def _rates(name: str, **values):
    """Every value a finite number >= 0 (a negative or NaN learning rate is a bug)."""
    for k, v in values.items():
        if v is not None:
            check_rate(name, v, k)


def _positive(name: str, **ints):
    for k, v in ints.items():
        if not v > 0:                               # NaN fails too
            raise ValueError(f"{name}: {k} must be positive, got {v}")


def constant(value: float) -> Schedule:
    """:math:`\\eta(t) = \\eta_0`. Example: ``adam(constant(1e-3))`` is ``adam(1e-3)``."""
    _rates("constant", value=value)
    return lambda step: jnp.full((), value, dtype=_float(step).dtype)


def linear(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """Linear ramp: :math:`\\eta(t) = \\eta_0 + (\\eta_1 - \\eta_0)\\min(t, T)/T`.

    Example: ``linear(0.0, 1e-3, 100)`` warms up over 100 steps, then stays at 1e-3.
    """
    _positive("linear", transition_steps=transition_steps)
    return polynomial(init_value, end_value, 1, transition_steps)


def step_decay(init_value: float, decay_rate: float, step_size: int) -> Schedule:
    """Step decay: :math:`\\eta(t) = \\eta_0\\,\\gamma^{\\lfloor t / s \\rfloor}`.

    Example: ``step_decay(0.1, 0.5, 30)`` halves the rate every 30 steps.
    """
    return exponential_decay(init_value, decay_rate, step_size, staircase=True)


def exponential_decay(init_value: float, decay_rate: float, decay_steps: int,
                      staircase: bool = False, end_value: float | None = None) -> Schedule:
    """Exponential decay: :math:`\\eta(t) = \\eta_0\\,\\gamma^{t / s}` (``staircase``: :math:`\\lfloor t/s \\rfloor`).

    ``end_value`` bounds the value (from below when :math:`\\gamma < 1`).
    Example: ``exponential_decay(1e-2, 0.96, 1000)`` loses 4% every 1000 steps.
    """
    _positive("exponential_decay", decay_steps=decay_steps, decay_rate=decay_rate)
    _rates("exponential_decay", init_value=init_value, end_value=end_value)

    def schedule(step):
        p = _float(step) / decay_steps
        v = init_value * jnp.power(decay_rate, jnp.floor(p) if staircase else p)
        if end_value is None:
            return v
        return jnp.maximum(v, end_value) if decay_rate < 1 else jnp.minimum(v, end_value)

    return schedule


def cosine_annealing(init_value: float, decay_steps: int, end_value: float = 0.0) -> Schedule:
    """Cosine annealing to a floor (Loshchilov & Hutter, 2017, without restarts).

    :math:`\\eta(t) = \\eta_{end} + \\tfrac12(\\eta_0 - \\eta_{end})(1 + \\cos(\\pi \\min(t, T)/T))`.
    Example: ``cosine_annealing(1e-2, 5000, end_value=1e-4)``.
    """
    _positive("cosine_annealing", decay_steps=decay_steps)
    _rates("cosine_annealing", init_value=init_value, end_value=end_value)

    def schedule(step):
        t = jnp.minimum(_float(step), decay_steps)
        return end_value + 0.5 * (init_value - end_value) * (1 + jnp.cos(math.pi * t / decay_steps))

    return schedule


def warmup_cosine(init_value: float, peak_value: float, warmup_steps: int, decay_steps: int,
                  end_value: float = 0.0) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine annealing to ``end_value``.

    ``decay_steps`` counts the whole schedule, warmup included (as optax's
    ``warmup_cosine_decay_schedule``): the peak is at ``warmup_steps``, the floor from
    ``decay_steps`` on. Example: ``warmup_cosine(0.0, 1e-3, 500, 10_000, 1e-5)``.
    """
    _positive("warmup_cosine", warmup_steps=warmup_steps,
              cosine_steps=decay_steps - warmup_steps)
    return join([linear(init_value, peak_value, warmup_steps),
                 cosine_annealing(peak_value, decay_steps - warmup_steps, end_value)],
                [warmup_steps])


def one_cycle(total_steps: int, peak_value: float, pct_start: float = 0.3,
              div_factor: float = 25.0, final_div_factor: float = 1e4) -> Schedule:
    """One-cycle (Smith & Topin, 2018), cosine form as PyTorch's ``OneCycleLR`` and optax.

    Cosine rise from :math:`\\eta_{max}/d` to :math:`\\eta_{max}` over the first
    ``int(pct_start * total_steps)`` steps, cosine fall to :math:`\\eta_{max}/(d\\,d_{final})` at
    ``total_steps``, then constant. Example: ``sgd(one_cycle(10_000, 0.1), momentum=0.9)``.
    """
    _positive("one_cycle", total_steps=total_steps, div_factor=div_factor,
              final_div_factor=final_div_factor)
    _rates("one_cycle", peak_value=peak_value)
    start = peak_value / div_factor
    end = start / final_div_factor
    warm = int(pct_start * total_steps)
    pieces = [cosine_annealing(start, max(warm, 1), peak_value),
              cosine_annealing(peak_value, max(total_steps - warm, 1), end)]
    return join(pieces, [warm])


def polynomial(init_value: float, end_value: float, power: float, transition_steps: int,
               transition_begin: int = 0) -> Schedule:
    """Polynomial decay: :math:`\\eta(t) = \\eta_{end} + (\\eta_0 - \\eta_{end})(1 - \\tau/T)^p`,

    :math:`\\tau = \\operatorname{clip}(t - t_0, 0, T)`, :math:`t_0` = ``transition_begin``.
    Example: ``polynomial(1e-2, 1e-4, 2.0, 10_000)``.
    """
    _positive("polynomial", transition_steps=transition_steps)
    _rates("polynomial", init_value=init_value, end_value=end_value)

    def schedule(step):
        tau = jnp.clip(_float(step) - transition_begin, 0, transition_steps)
        return end_value + (init_value - end_value) * (1 - tau / transition_steps) ** power

    return schedule


def piecewise_constant(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """:math:`\\eta(t) = v_i` where :math:`i` counts the boundaries :math:`b_j \\le t`.

    ``values`` has one entry more than ``boundaries``; ``boundaries`` increase.
    Example: ``piecewise_constant([100, 200], [0.1, 0.01, 0.001])``.
    """
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"piecewise_constant: expected {len(boundaries) + 1} values for "
                         f"{len(boundaries)} boundaries, got {len(values)}")
    return join([constant(v) for v in values], boundaries)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, restarting its own clock at 0.

    :math:`\\eta(t) = s_i(t - b_{i-1})` for :math:`b_{i-1} \\le t < b_i`.
    Example: ``join([linear(0, 1e-3, 100), constant(1e-3)], [100])``.
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"join: expected {len(boundaries) + 1} schedules for "
                         f"{len(boundaries)} boundaries, got {len(schedules)}")
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"join: boundaries must increase, got {list(boundaries)}")

    def schedule(step):
        out = schedules[0](step)
        for b, s in zip(boundaries, schedules[1:]):
            out = jnp.where(step < b, out, s(step - b))
        return out

    return schedule
