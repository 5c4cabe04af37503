"""Progress display for :func:`fnn.train.fit`, on stderr: a tqdm bar on a terminal, else one
plain line per epoch (a log file, a pipe, CI: Keras' ``verbose=2``)."""
from __future__ import annotations

__all__ = ["Progress", "say"]

import math
import sys


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


class Progress:
    """What ``fit`` shows after each epoch, on stderr. ``progress``: ``"auto"`` (a tqdm bar
    when stderr is a terminal, else lines), ``True`` (the bar; lines without tqdm),
    ``"lines"`` (one line per epoch, every epoch: ``epoch 3/20 loss 0.41 ...``) or ``False``
    (nothing). ``close(reason)`` prints why training stopped early."""

    def __init__(self, progress, epochs, initial=0):
        if progress == "auto":
            progress = True if _terminal() else "lines"
        self.bar, self.lines, self.epochs = None, progress == "lines", epochs
        if progress is True:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=epochs, initial=initial, unit="epoch", desc="fit",
                                file=sys.stderr, disable=False)
            except ImportError:
                self.lines = True

    def update(self, logs):
        if self.bar is None and not self.lines:
            return
        shown = {k: f"{v:.4g}" for k, v in logs.items()
                 if k not in ("epoch", "time") and not (isinstance(v, float) and math.isnan(v))}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        else:
            print(f"epoch {logs['epoch']}/{self.epochs} " + " ".join(
                f"{k} {v}" for k, v in shown.items()), file=sys.stderr, flush=True)

    def close(self, reason=None):
        if self.bar is not None:
            self.bar.close()
        if reason and (self.bar is not None or self.lines):
            print(reason, file=sys.stderr, flush=True)
