"""The tuner itself: :func:`choose` times a choice point's candidates on the shapes at hand,
keeps those whose results agree with the default's, and remembers the fastest.

A choice point is one function that lists its candidate formulations side by side
(:class:`Candidate`: a name, the function to time, the compiler options to compile it with, and
the value the choice point returns when it wins) and calls :func:`choose`. The first candidate is
the default: the formulation used when the tuner is off, when nothing else is measurably faster,
and the reference every other candidate's result is checked against. Measuring happens once per
machine, jaxlib and key: the choice is kept in memory and in the on-disk cache
(:mod:`fnn.tuning.cache`).

Measuring runs in a helper thread: a choice point is usually reached while JAX traces the user's
function, and the thread starts outside that trace, so its compiled candidates really run. The
thread enters the JAX settings the caller's thread has set for itself (context managers such as
``jax.default_matmul_precision``), so its candidates compile as the caller's would.
"""
from __future__ import annotations

import contextlib
import datetime
import threading
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from fnn.tuning import cache
from fnn.tuning._settings import STATE, enabled, median
from fnn.tuning import options
from fnn.tuning.options import accepted, in_effect, record

__all__ = ["Candidate", "choose", "agree", "measured", "best", "memo_entries"]


class Candidate(NamedTuple):
    """One formulation of a choice point: ``name`` (unique within the point), ``run`` (a pure
    function of the measurement's arguments, jitted by the tuner), ``options``: the name of the
    compiler-option set (:data:`fnn.tuning.OPTION_SETS`) to compile it with, and ``value``: what
    the choice point returns when this candidate wins (``None``: the name)."""
    name: str
    run: Callable
    options: str = "default"
    value: Any = None


_MEMO: dict[str, dict] = {}
_LOCK = threading.Lock()
_THREAD = "fnn-tuning"


def measuring() -> bool:
    """Whether this code runs in the tuner's measuring thread: traced as one of a choice
    point's candidates (a layer inside ``stack(..., remat="auto")``'s measurement)."""
    return threading.current_thread().name == _THREAD


def _memo_lock():
    """The memo's lock; none in a measuring thread: a choice point reached while another's
    candidate compiles (attention's inside ``stack``'s) is measured there, while the outer
    one holds the lock and waits for it."""
    return contextlib.nullcontext() if measuring() else _LOCK


def agree(ref, out, power: float = 0.5, whole: bool = False) -> str | None:
    """``None`` if ``out`` equals ``ref`` within floating-point rounding (same tree, shapes and
    dtypes; the same non-finite entries; per leaf ``max|out - ref| <= eps**power · max|ref|``,
    eps of the leaf's dtype: ``sqrt(eps)`` by default), else why not. ``whole``: ``max|ref|``
    over every leaf, for a whole program's results (a leaf that is a small sum of cancelling
    terms, a bias's gradient, moves by more than its own scale's rounding)."""
    r_leaves, r_tree = jax.tree.flatten(ref)
    o_leaves, o_tree = jax.tree.flatten(out)
    if r_tree != o_tree:
        return f"a different result structure ({o_tree} instead of {r_tree})"
    overall = max((float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0))
                   for a in map(np.asarray, r_leaves) if np.issubdtype(a.dtype, np.inexact)),
                  default=0.0)
    for i, (r, o) in enumerate(zip(r_leaves, o_leaves)):
        r, o = np.asarray(r), np.asarray(o)
        if r.shape != o.shape or r.dtype != o.dtype:
            return f"leaf {i}: {o.dtype}{list(o.shape)} instead of {r.dtype}{list(r.shape)}"
        if not np.issubdtype(r.dtype, np.inexact):
            if not np.array_equal(r, o):
                return f"leaf {i}: different integer values"
            continue
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        fin = np.isfinite(r64)
        if not np.array_equal(fin, np.isfinite(o64)) or not np.array_equal(r64[~fin], o64[~fin],
                                                                         equal_nan=True):
            return f"leaf {i}: different non-finite entries"
        if fin.any():
            scale = overall if whole else float(np.max(np.abs(r64[fin])))
            err = float(np.max(np.abs(r64[fin] - o64[fin])))
            tol = float(np.finfo(r.dtype).eps) ** power * max(scale, np.finfo(r.dtype).tiny)
            if err > tol:
                return f"leaf {i}: max difference {err:.3g} > {tol:.3g} (scale {scale:.3g})"
    return None


def memo_entries() -> list[dict]:
    """The entries measured or read by this process."""
    with _LOCK:
        return list(_MEMO.values())


def _block(x):
    return jax.block_until_ready(x)


SLOW = 10
"""A candidate whose first run takes over this many times the default's is not timed further
(it cannot win; a pathological form would otherwise spend the budget many times over)."""


def _measure(candidates: list[Candidate], make_args: Callable[[], tuple],
             power: float = 0.5, whole: bool = False) -> dict:
    """Compile, verify and time the candidates (the first is the reference); the entry. The
    budget counts from the default's first result: compiling the default is what the program
    costs anyway, the budget is what the others add."""
    t0 = time.perf_counter()
    args = make_args()
    compiled, times, rejected = {}, {}, {}
    ref = None
    for i, c in enumerate(candidates):
        if i and time.perf_counter() - t0 > STATE.budget:
            rejected[c.name] = "not measured: over the time budget"
            continue
        opts = options.OPTION_SETS.get(c.options)
        if opts is None or not accepted(c.options):
            rejected[c.name] = f"compiler options {c.options!r} not accepted by this jaxlib"
            continue
        try:
            fn = jax.jit(c.run, compiler_options=dict(opts) or None).lower(*args).compile()
            t_run = time.perf_counter()
            out = jax.device_get(_block(fn(*args)))
            t_run = time.perf_counter() - t_run
        except Exception as e:          # a candidate that fails to compile or run is not chosen
            rejected[c.name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        if ref is not None and t_run > SLOW * first_run:       # not worth timing rounds of
            rejected[c.name] = (f"not measured: its first run took {t_run * 1e3:.0f} ms, over "
                                f"{SLOW}× the default's {first_run * 1e3:.0f} ms")
            continue
        if ref is None:
            first_run = t_run
            if i:                       # the default itself failed: nothing is comparable
                rejected[c.name] = "not measured: the default failed"
                continue
            ref, t0 = out, time.perf_counter()
        else:
            why = agree(ref, out, power, whole)
            if why:
                rejected[c.name] = f"result differs from the default's: {why}"
                continue
        compiled[c.name] = fn
    for r in range(STATE.rounds):       # interleaved rounds; medians
        spent = time.perf_counter() - t0
        if (r >= 3 and spent > STATE.budget) or (r >= 1 and spent > 2 * STATE.budget):
            break
        for name, fn in compiled.items():
            times.setdefault(name, []).append(float(STATE.timer(name, lambda: _block(fn(*args)))))
    return {"times_ms": {n: median(t) * 1e3 for n, t in times.items()}, "rejected": rejected,
            "options": {c.name: c.options for c in candidates},
            "seconds": round(time.perf_counter() - t0, 3),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _local_settings() -> list:
    """The JAX settings this thread has set for itself (``with jax.default_matmul_precision(...)``,
    ``jax.numpy_dtype_promotion(...)``, ...) as ``(state, value)`` pairs: a new thread starts
    from the process's settings, so the measuring thread enters these again and compiles the
    candidates as the caller's trace would. Empty where this JAX keeps them otherwise."""
    try:
        from jax._src import config as jc
        unset = jc.config_ext.unset
        return [(st, v) for st in list(jc.config_states.values())
                if (v := st.get_local()) is not unset]
    except Exception:                  # noqa: BLE001 -- an internal API: the global settings
        return []


def _in_thread(fn, *args):
    box, settings = {}, _local_settings()

    def target():
        try:
            with contextlib.ExitStack() as stack:
                for state, value in settings:
                    stack.enter_context(state(value))
                box["out"] = fn(*args)
        except BaseException as e:     # noqa: BLE001 -- re-raised in the caller's thread
            box["err"] = e
    t = threading.Thread(target=target, name=_THREAD, daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


def measured(point: str, key, candidates: list[Candidate],
             make_args: Callable[[], tuple], power: float = 0.5,
             whole: bool = False) -> dict | None:
    """The cached entry of ``point`` at ``key`` (measured now if it is new); ``None`` when the
    tuner is off. Never raises: a failure to measure warns and yields ``None``. Candidates must
    agree with the default as :func:`agree` with ``power`` and ``whole`` says."""
    if not enabled():
        return None
    k = cache.full_key(point, key)
    kk = cache.canonical(k)
    names = {c.name for c in candidates}
    with _memo_lock():
        entry = _MEMO.get(kk)
        if entry is None or not set(entry.get("times_ms", {})) <= names:
            entry = cache.load(k)
            if entry is None or not set(entry.get("times_ms", {})) <= names:
                try:
                    entry = _in_thread(_measure, candidates, make_args, power, whole)
                except Exception as e:           # noqa: BLE001 -- never crash a user's trace
                    warnings.warn(f"fnn.tuning: measuring {point} failed ({type(e).__name__}: "
                                  f"{e}); using its default", RuntimeWarning, stacklevel=3)
                    return None
                entry["path"] = cache.store(k, entry)
                entry["key"] = k
            _MEMO[kk] = entry
    record(point, entry)
    return entry


def best(entry: Mapping | None, candidates: list[Candidate], options: str | None) -> Candidate:
    """The fastest measured candidate compiled with option set ``options`` (``None``: any),
    unless it beats that set's first candidate by less than the margin; the first candidate of
    the set when nothing was measured. ``options`` that no candidate names: all candidates."""
    pool = [c for c in candidates if options is None or c.options == options] or candidates
    if entry is None:
        return pool[0]
    times = entry.get("times_ms", {})
    default = pool[0]
    ok = [c for c in pool if c.name in times]
    if not ok:
        return default
    fastest = min(ok, key=lambda c: times[c.name])
    base = times.get(default.name)
    if base is not None and times[fastest.name] > base * (1 - STATE.margin):
        return default
    return fastest


def choose(point: str, key, candidates: list[Candidate], make_args: Callable[[], tuple]):
    """The choice point's answer: the winning candidate's ``value`` (or name) among those
    compiled with the compiler options in effect (:func:`fnn.tuning.options.in_effect`); the
    first candidate's when the tuner is off. ``key``: JSON-able, what the timings depend on
    (shapes, dtypes, static arguments); ``make_args()``: the measurement's arguments (random
    arrays of those shapes)."""
    c = best(measured(point, key, candidates, make_args), candidates, in_effect())
    return c.name if c.value is None else c.value
