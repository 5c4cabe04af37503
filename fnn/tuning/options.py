"""Compiler options per function: the option sets the tuner may choose between, the probe that
an installed jaxlib accepts one, and :func:`jit`, fnn's ``jax.jit`` that picks a set per
function and argument shapes by measurement.

The options go to ``jax.jit(..., compiler_options=...)`` of fnn's own compiled functions (the
train step and epoch), never into ``XLA_FLAGS`` or a process-wide setting: a user's other JAX
code compiles exactly as before.

XLA:CPU (jaxlib 0.10.2) sends convolutions, dots and reductions to YNNPACK by default (the
``xla_cpu_experimental_ynn_fusion_type`` list ``INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION,
REDUCE``). On some CPUs XLA's own convolution is faster than YNNPACK's, and then XLA's
convolution-shaped kernel gradient beats the im2col matmul as well (``benchmarks/RESULTS.md``);
the set ``"conv off YNNPACK"`` keeps dots and reductions on YNNPACK and takes only the
convolutions off it. Which set a function gets is measured on its own convolutions.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import threading
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np

from fnn.tuning._settings import enabled

__all__ = ["OPTION_SETS", "accepted", "in_effect", "jit", "TunedJit"]

_YNN = "xla_cpu_experimental_ynn_fusion_type"

#: The compiler-option sets a tuned function may be compiled with, by name. ``"default"`` is
#: jaxlib's own configuration (no options).
OPTION_SETS = MappingProxyType({
    "default": MappingProxyType({}),
    "conv off YNNPACK": MappingProxyType(
        {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}),
})

_IN_EFFECT: contextvars.ContextVar[str] = contextvars.ContextVar("fnn_tuning_options",
                                                                 default="default")
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("fnn_tuning_recording",
                                                                         default=None)
_PROBED: dict = {}
_PROBE_LOCK = threading.Lock()


def _probe(options) -> bool:
    def tiny(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO",
                                                                                "NWC"))
        return jnp.sum(y @ jnp.ones((2, 2), y.dtype))
    args = (np.ones((1, 4, 2), np.float32), np.ones((3, 2, 2), np.float32))
    try:
        jax.jit(tiny, compiler_options=dict(options) or None).lower(*args).compile()
    except Exception:               # noqa: BLE001 -- an option this jaxlib does not know
        return False
    return True


def accepted(name: str) -> bool:
    """Whether the installed jaxlib compiles a small program with option set ``name`` (probed
    once per process; an unknown name is not accepted)."""
    if name not in OPTION_SETS:
        return False
    options = tuple(sorted(OPTION_SETS[name].items()))
    with _PROBE_LOCK:
        if options not in _PROBED:
            _PROBED[options] = _probe(OPTION_SETS[name])
        return _PROBED[options]


def in_effect() -> str:
    """The option set of the fnn function being traced now (``"default"`` outside
    :func:`jit`: a plain ``jax.jit`` compiles with jaxlib's defaults)."""
    return _IN_EFFECT.get()


def record(point: str, entry) -> None:
    """Called by the tuner for each choice point reached while :class:`TunedJit` traces."""
    seen = _RECORDING.get()
    if seen is not None and entry is not None:
        seen.append((point, entry))


def _signature(args, kwargs):
    leaves, tree = jax.tree.flatten((args, kwargs))
    sig = []
    for a in leaves:
        if hasattr(a, "shape") and hasattr(a, "dtype"):      # (str(dtype) would cost 15 us)
            sig.append((a.shape, a.dtype))
        else:
            sig.append((type(a).__name__, a if isinstance(a, (int, float, bool, str)) else id(a)))
    return tree, tuple(sig)


def _fresh(fun):
    """A new function object calling ``fun`` (so JAX's trace cache, keyed on the function,
    does not hand one option set's trace to another)."""
    @functools.wraps(fun)
    def f(*args, **kwargs):
        return fun(*args, **kwargs)
    return f


def _option_set(points) -> str:
    """The option set with the least summed time over the recorded choice points (each at its
    fastest candidate under that set); ``"default"`` unless another wins by the margin."""
    from fnn.tuning._settings import STATE
    totals = {}
    for name in OPTION_SETS:
        if not accepted(name):
            continue
        total = 0.0
        for _, entry in points:
            times = [t for c, t in entry.get("times_ms", {}).items()
                     if entry.get("options", {}).get(c) == name]
            if not times:
                break
            total += min(times)
        else:
            totals[name] = total
    base = totals.get("default")
    if not totals or base is None:
        return "default"
    name = min(totals, key=totals.get)
    return name if totals[name] < base * (1 - STATE.margin) else "default"


#: How closely a whole function compiled with other options must agree with jaxlib's defaults:
#: every result entry within ``eps**WHOLE_POWER`` (float32: 1.9e-2) of the largest entry of any
#: result (:func:`fnn.tuning.agree` with ``whole``). A whole program's float32 rounding moves
#: more than one operation's when its kernels change (ResNet-18's training step: a bias 4% of its
#: own largest entry), and each option's operations were checked one by one where they were
#: chosen (:func:`fnn.tuning.choose`, at ``sqrt(eps)``: where a wrong kernel is caught): this
#: check is for a program that comes out wrong as a whole (non-finite, a different structure,
#: values off by more than a few percent of the largest result).
WHOLE_POWER = 0.25


#: The option set a function with convolutions but no choice point (``jax.grad`` of a CNN) is
#: timed with, against jaxlib's defaults, as a whole (:meth:`TunedJit._confirm`).
CONV_OPTIONS = "conv off YNNPACK"


class TunedJit:
    """``jax.jit(fun, **jit_kwargs)`` whose compiler options are chosen per argument shapes:
    the first call with new shapes traces ``fun`` once with jaxlib's defaults, which reaches
    (and measures) its choice points; if an option set (:data:`OPTION_SETS`) is faster over
    them, ``fun`` is compiled with it, and its choice points trace with that set in effect. A
    function with convolutions and no choice point (JAX's own gradient of a CNN) is timed
    whole under :data:`CONV_OPTIONS` against the defaults. With the tuner off (or neither in
    ``fun``) it is ``jax.jit(fun, **jit_kwargs)``."""

    def __init__(self, fun, **jit_kwargs):
        self.fun, self.jit_kwargs = fun, jit_kwargs
        self.plain = jax.jit(_fresh(fun), **jit_kwargs)      # never another jit's cached trace
        self._by_options = {"default": self.plain}
        self._chosen: dict = {}
        self._no_options = False     # no choice point here depends on compiler options
        functools.update_wrapper(self, fun)

    def options_for(self, *args, **kwargs) -> str:
        """The option set chosen for these arguments (measuring now if they are new)."""
        if not enabled():
            return "default"
        sig = _signature(args, kwargs)
        name = self._chosen.get(sig)
        if name is None:
            seen = []
            token = _RECORDING.set(seen)
            try:
                traced = self.plain.trace(*args, **kwargs)
            finally:
                _RECORDING.reset(token)
            seen = [(p, e) for p, e in seen if set(e.get("options", {}).values()) - {"default"}]
            if seen:
                name = _option_set(seen)
            else:           # convolutions that reach no choice point (JAX's own gradients)
                from fnn.layers._conv_layout import has_convolution
                name = CONV_OPTIONS if has_convolution(traced.jaxpr.jaxpr) and accepted(
                    CONV_OPTIONS) else "default"
            # whether a choice point or a convolution is reached depends on fun's structure,
            # not on the shapes: none here means none for any shapes, and calls skip the
            # signature from now on
            self._no_options = name == "default" and not seen and len(self._chosen) == 0
            if name != "default":
                name = self._confirm(name, args, kwargs)
            self._chosen[sig] = name
        return name

    def _confirm(self, name: str, args, kwargs) -> str:
        """``name`` if the whole function compiled with it is faster than with jaxlib's
        defaults (and gives the same results), else ``"default"``. The choice points time their
        own operations, alone, and options chosen from those timings can make the whole
        function slower (the digits CNN's ``fit`` epoch ran 20× slower under "conv off
        YNNPACK" and the kernel-gradient forms chosen under it). Timed as the choice point
        ``jit.options``, keyed by the function's program (cached on disk); within the tuner's
        budget, so a function whose one run takes longer keeps the defaults."""
        from fnn.tuning.measure import Candidate, best, measured
        if kwargs:
            return "default"
        program = self.plain.trace(*args).lower().as_text()
        key = {"program": hashlib.sha256(program.encode()).hexdigest(), "options": name}

        def candidate(opt):
            def run(*a):
                token = _IN_EFFECT.set(opt)         # its choice points trace for ``opt``
                try:
                    return self.fun(*a)
                finally:
                    _IN_EFFECT.reset(token)
            return Candidate(opt, run, opt)
        candidates = [candidate("default"), candidate(name)]
        return best(measured("jit.options", key, candidates, lambda: args, power=WHOLE_POWER,
                             whole=True), candidates, None).name

    def _jitted(self, name):
        if name not in self._by_options:
            self._by_options[name] = jax.jit(_fresh(self.fun), **self.jit_kwargs,
                                             compiler_options=dict(OPTION_SETS[name]))
        return self._by_options[name]

    @contextlib.contextmanager
    def _effect(self, name):
        token = _IN_EFFECT.set(name)
        try:
            yield self._jitted(name)
        finally:
            _IN_EFFECT.reset(token)

    def __call__(self, *args, **kwargs):
        if self._no_options or not enabled():
            return self.plain(*args, **kwargs)
        with self._effect(self.options_for(*args, **kwargs)) as f:
            return f(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """``jax.jit``'s ``lower`` of the function compiled with the chosen options."""
        with self._effect(self.options_for(*args, **kwargs)) as f:
            return f.lower(*args, **kwargs)


def jit(fun=None, **jit_kwargs):
    """fnn's ``jax.jit`` with compiler options chosen by measurement (:class:`TunedJit`);
    usable as ``jit(f, donate_argnums=0)`` or ``functools.partial(jit, donate_argnums=0)``."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return TunedJit(fun, **jit_kwargs)
