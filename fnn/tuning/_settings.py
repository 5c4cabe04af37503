"""The tuner's settings: on or off, the timer, the time budget per choice, the cache directory.

``FNN_TUNE=off`` (or ``0``/``false``/``no``) turns the tuner off for the process; so does
:func:`enable` ``(False)``. ``FNN_TUNE_BUDGET``: seconds per choice (default 4, compiling
included; candidates not reached within it are not chosen). Off, every choice point returns its default formulation (the one fnn
used before the tuner existed) and nothing is timed, compiled or written.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable

import jax

__all__ = ["enabled", "enable", "settings", "default_timer", "default_dir"]

_OFF = ("off", "0", "false", "no")


def default_timer(name: str, run: Callable[[], Any]) -> float:
    """One timing of a candidate: seconds of ``run()`` (which blocks until its result is
    ready). The tuner calls it in interleaved rounds and takes the median per candidate."""
    del name
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def default_dir() -> str:
    """``$FNN_TUNE_DIR`` if set, else ``$XDG_CACHE_HOME/fnn/tune`` (``~/.cache/fnn/tune``):
    beside :func:`fnn.compilation.default_cache_dir`'s ``jax`` folder."""
    if os.environ.get("FNN_TUNE_DIR"):
        return os.environ["FNN_TUNE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fnn", "tune")


class _State:
    enabled: bool | None = None        # None: read FNN_TUNE
    timer: Callable[[str, Callable[[], Any]], float] = staticmethod(default_timer)
    budget: float = float(os.environ.get("FNN_TUNE_BUDGET") or 4.0)   # s per choice, compiles too
    rounds: int = 5                    # timing rounds at most (3 at least when the budget allows)
    directory: str | None = None       # None: default_dir()
    margin: float = 0.03               # a candidate must beat the default by 3% to replace it


STATE = _State()


def enabled() -> bool:
    """Whether choice points measure (and use measured choices): ``FNN_TUNE`` unless
    :func:`enable` was called, and only where the default backend is the CPU (GPUs and TPUs
    have their own autotuners; there fnn uses each choice point's default)."""
    on = STATE.enabled
    if on is None:
        on = os.environ.get("FNN_TUNE", "on").strip().lower() not in _OFF
    return on and jax.default_backend() == "cpu"


def enable(flag: bool | None = True) -> None:
    """Turn the tuner on or off for this process (``None``: back to ``FNN_TUNE``)."""
    STATE.enabled = None if flag is None else bool(flag)


@contextlib.contextmanager
def settings(*, enabled: bool | None = None, timer=None, budget: float | None = None,
             rounds: int | None = None, directory=None, margin: float | None = None):
    """A context with some settings changed (restored on exit): ``enabled``; ``timer``, a
    ``(candidate_name, run) -> seconds`` function (tests pass a fake one: the suite times
    nothing); ``budget`` seconds per choice; ``rounds`` of timing; ``directory`` of the on-disk
    cache; ``margin``, the fraction by which a candidate must beat the default."""
    new = {"enabled": enabled, "timer": timer, "budget": budget, "rounds": rounds,
           "directory": None if directory is None else os.fspath(directory), "margin": margin}
    old = {k: getattr(STATE, k) for k in new}
    try:
        for k, v in new.items():
            if v is not None:
                setattr(STATE, k, v)
        yield STATE
    finally:
        for k, v in old.items():
            setattr(STATE, k, v)


def median(values):
    return statistics.median(values) if values else float("inf")
