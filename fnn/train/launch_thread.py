"""An epoch launched from a helper thread. XLA:CPU runs a program that holds a host callback
(``fit``'s in-epoch step reports) in the call that launches it, so such an epoch launched
ahead of the previous one's bookkeeping would run before that bookkeeping; from one helper
thread it runs beside it (:meth:`fnn.train.loops.InMemory.ahead`)."""
from __future__ import annotations

import concurrent.futures

__all__ = ["Pending", "ready"]


class Pending:
    """``fn(*args, **kwargs)`` (a launch) running in the helper thread: ``before`` is the state
    it was launched from, :func:`ready` waits for its result."""

    _POOL: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def _pool(cls):
        if cls._POOL is None:
            cls._POOL = concurrent.futures.ThreadPoolExecutor(1, "fnn-epoch")
        return cls._POOL

    def __init__(self, before, fn, *args, **kwargs):
        self.before = before
        self.future = self._pool().submit(fn, *args, **kwargs)

    @classmethod
    def traces_alike(cls) -> bool:
        """Whether the helper thread would run the epoch as this thread does: JAX's
        thread-local settings (``with jax.default_matmul_precision(...)`` and the like) hold in
        the thread that set them only, and under others the epoch would be compiled again,
        differently. Not where they differ (or cannot be compared)."""
        try:
            from jax._src.config import trace_context
        except ImportError:         # pragma: no cover -- a JAX without it: never in a thread
            return False
        return cls._pool().submit(trace_context).result() == trace_context()


def ready(launched):
    """The result of a :class:`Pending` launch (waiting for it), or ``launched`` itself."""
    return launched.future.result() if isinstance(launched, Pending) else launched
