"""A warm start: JAX's persistent compilation cache in a user cache directory, and compile
time measured apart from the rest.

The second run of a program that compiled once reads its executables from disk instead of
compiling them again (``fnn train digits-cnn --quick``: several seconds of compilation become a
fraction of one). The ``fnn`` command turns the cache on by default (``--no-compile-cache``
turns it off); in a script or notebook it is one call::

    fnn.compilation.enable_cache()          # ~/.cache/fnn/jax, or $FNN_CACHE_DIR
    with fnn.compilation.CompileTimer() as timer:
        result = fnn.train.fit(...)
    print(timer.seconds)                    # time spent compiling (or reading the cache)

The cache is JAX's own (``jax_compilation_cache_dir``): entries are keyed by the program, the
compiler options, the jaxlib version and the device, written atomically, and safe for several
processes sharing one directory. It is process-wide, like every JAX configuration option.
"""
from __future__ import annotations

import os
import time

import jax
from jax import monitoring

__all__ = ["default_cache_dir", "enable_cache", "CompileTimer"]

# JAX's monitoring event around each backend compilation (jax/_src/dispatch.py); it includes a
# program read back from the persistent cache instead of compiled
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> str:
    """``$FNN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fnn/jax`` (``~/.cache/fnn/jax``)."""
    if os.environ.get("FNN_CACHE_DIR"):
        return os.environ["FNN_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fnn", "jax")


def enable_cache(directory: str | os.PathLike | None = None, *,
                 min_compile_seconds: float = 0.0) -> str:
    """Turn on JAX's persistent compilation cache in ``directory`` (default
    :func:`default_cache_dir`, created if missing); returns the directory.

    ``min_compile_seconds``: programs that compile faster than this are not written (JAX's own
    default is 1 s, which would leave out most of a small model's programs; 0 keeps every one).
    A directory that cannot be created raises ``OSError`` naming it.
    """
    path = os.fspath(directory) if directory is not None else default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"fnn.compilation.enable_cache: cannot create the cache "
                               f"directory {path!r}: {e.strerror}") from None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileTimer:
    """A context that sums the seconds JAX spends compiling (and reading compiled programs back
    from the persistent cache) while it is open, in any thread: ``timer.seconds``,
    ``timer.compiles`` (programs compiled or read back), ``timer.cache_hits`` (read back from
    the persistent cache), ``timer.wall`` (the context's own duration). Tracing and lowering
    are not included (they are Python work)."""

    def __init__(self):
        self.seconds, self.compiles, self.cache_hits, self.wall = 0.0, 0, 0, 0.0
        self._open = False

    def _duration(self, event, seconds, **_):
        if self._open and event == _COMPILE_EVENT:
            self.seconds += seconds
            self.compiles += 1

    def _event(self, event, **_):
        if self._open and event == _CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self):
        self._open, self._t0 = True, time.perf_counter()
        monitoring.register_event_duration_secs_listener(self._duration)
        monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc):
        self._open = False
        self.wall = time.perf_counter() - self._t0
        for unregister, listener in ((monitoring.unregister_event_duration_listener,
                                      self._duration),
                                     (monitoring.unregister_event_listener, self._event)):
            try:
                unregister(listener)
            except (AssertionError, ValueError):     # already gone: nothing to undo
                pass
        return False
