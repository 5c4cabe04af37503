"""Progress display for :func:`fnn.train.fit`, on stderr: a tqdm bar on a terminal, else one
plain line per epoch (a log file, a pipe, CI: Keras' ``verbose=2``).

On a terminal a second bar shows the steps of the epoch running, with its rate, ETA and
running loss (as Keras' and Lightning's bars do). An in-memory epoch is one compiled call:
it reports its steps from inside through a host callback (:func:`tick`, every
``every`` steps, see :func:`tick_every`); a streamed epoch reports after each chunk.
"""
from __future__ import annotations

__all__ = ["Progress", "say"]

import math
import sys
import threading

from fnn.tuning.measure import measuring


def say(text: str):
    """Print one line to stderr above a live tqdm bar (redrawn below it), or plainly."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(text, file=sys.stderr, flush=True)
    else:
        tqdm.write(text, file=sys.stderr)
        sys.stderr.flush()


def _terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def shows_steps(progress) -> bool:
    """Whether ``Progress(progress, ...)`` draws the bar, with the epoch's steps in it."""
    if progress == "auto":
        progress = _terminal()
    if progress is not True:
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


_LISTENING: list = []
"""The :class:`Progress` displays of the ``fit`` calls running (latest last): the compiled
epochs are shared between calls, so their callback finds its display here."""


def tick(steps, loss_sum, examples):
    """Called from inside a compiled epoch (``jax.debug.callback``): ``steps`` of the epoch
    done, the sums of their loss (weighted by examples) and of their examples."""
    if _LISTENING and not measuring():          # not the tuner timing a compiled epoch
        n = float(examples)
        _LISTENING[-1].step(int(steps), float(loss_sum) / n if n else math.nan)


def tick_every(steps: int, seconds_per_epoch: float | None, interval: float = 0.25,
               first: int = 20) -> int:
    """Steps between two in-epoch reports: about ``interval`` seconds apart once an epoch's
    time is known (each report is a host callback, ~0.1 ms on a 2-core CPU), ``first``
    reports in an epoch before that; ``0`` (none) when the epoch is shorter than two
    intervals: its end is reported anyway."""
    if seconds_per_epoch is None:
        return max(1, steps // first) if steps > 1 else 0
    if seconds_per_epoch < 2 * interval:
        return 0
    return max(1, math.ceil(steps * interval / seconds_per_epoch))


class Progress:
    """What ``fit`` shows, on stderr. ``progress``: ``"auto"`` (a tqdm bar when stderr is a
    terminal, else lines), ``True`` (the bar; lines without tqdm), ``"lines"`` (one line per
    epoch, every epoch: ``epoch 3/20 loss 0.41 ...``) or ``False`` (nothing). With the bar,
    :meth:`step` moves a second bar over the epoch's steps (``steps``: per epoch, ``None``
    if not known yet). ``close(reason)`` prints why training stopped early."""

    def __init__(self, progress, epochs, initial=0, steps=None):
        if progress == "auto":
            progress = True if _terminal() else "lines"
        self.bar, self.lines, self.epochs = None, progress == "lines", epochs
        self.inner, self.steps, self.lock = None, steps, threading.Lock()
        self.shown = initial
        if progress is True:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=epochs, initial=initial, unit="epoch", desc="fit",
                                file=sys.stderr, disable=False)
                self.tqdm = tqdm
            except ImportError:
                self.lines = True

    @property
    def stepping(self) -> bool:
        """Whether in-epoch steps are shown (the terminal bar)."""
        return self.bar is not None

    def __enter__(self):
        if self.stepping:
            _LISTENING.append(self)
        return self

    def __exit__(self, *exc):
        if self in _LISTENING:
            _LISTENING.remove(self)

    def step(self, done: int, loss: float):
        """``done`` steps of the running epoch are done, their mean loss ``loss`` (from the
        compiled epoch's callback thread or the streamed loop)."""
        with self.lock:
            if self.bar is None:
                return
            if self.inner is None:
                self.inner = self.tqdm(total=self.steps, unit="step", leave=False, position=1,
                                       file=sys.stderr, desc=f"epoch {self.shown + 1}")
            elif done < self.inner.n:               # an epoch launched ahead began
                self.inner.reset(total=self.steps)
            self.inner.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.inner.update(done - self.inner.n)

    def update(self, logs, steps=None):
        """One epoch done, ``logs`` its history row; ``steps``: steps per epoch, if now
        known (a stream's first epoch)."""
        with self.lock:
            self.shown = logs["epoch"]
            self.steps = steps or self.steps or (self.inner.n if self.inner is not None
                                                 else None)    # a stream's first epoch
            if self.bar is None and not self.lines:
                return
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k not in ("epoch", "time")
                     and not (isinstance(v, float) and math.isnan(v))}
            if self.bar is not None:
                if self.inner is not None:             # the next epoch's steps, from 0
                    self.inner.set_description(f"epoch {self.shown + 1}", refresh=False)
                    self.inner.set_postfix_str("", refresh=False)
                    self.inner.reset(total=self.steps)
                self.bar.set_postfix(shown, refresh=False)
                self.bar.update(1)
            else:
                print(f"epoch {logs['epoch']}/{self.epochs} " + " ".join(
                    f"{k} {v}" for k, v in shown.items()), file=sys.stderr, flush=True)

    def close(self, reason=None):
        with self.lock:
            bar, self.bar = self.bar, None
            if self.inner is not None:
                self.inner.close()
                self.inner = None
            if bar is not None:
                bar.close()
        self.__exit__()
        if reason and (bar is not None or self.lines):
            print(reason, file=sys.stderr, flush=True)
