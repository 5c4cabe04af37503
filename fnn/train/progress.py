"""Progress display for :func:`fnn.train.fit`: a tqdm bar on a terminal, or printed lines."""
from __future__ import annotations

__all__ = ["Progress"]

import math
import sys


class Progress:
    """A tqdm bar over epochs with the latest metrics (``"auto"``: only on a terminal), or
    printed lines (``"lines"``: the first and last epoch and every tenth of the run), or
    nothing. ``close(reason)`` reports why training stopped early."""

    def __init__(self, progress, epochs, initial=0):
        self.bar, self.lines, self.epochs, self.pending = None, progress == "lines", epochs, None
        if progress and not self.lines:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=epochs, initial=initial, unit="epoch", desc="fit",
                                file=sys.stderr, disable=None if progress == "auto" else False)
            except ImportError:
                self.lines = progress is True

    def update(self, logs):
        if self.bar is None and not self.lines:
            return
        shown = {k: f"{v:.4g}" for k, v in logs.items()
                 if k not in ("epoch", "time") and not (isinstance(v, float) and math.isnan(v))}
        line = f"epoch {logs['epoch']}/{self.epochs} " + " ".join(f"{k} {v}"
                                                                 for k, v in shown.items())
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.lines:
            e = logs["epoch"]
            self.pending = line
            if e in (1, self.epochs) or e % max(1, self.epochs // 10) == 0:
                print(line, flush=True)
                self.pending = None

    def close(self, reason=None):
        if self.bar is not None:
            shown = not self.bar.disable             # tqdm's close() sets disable: read it first
            self.bar.close()
            if reason and shown:
                print(reason, file=sys.stderr, flush=True)
        elif self.lines:
            for text in (self.pending, reason):
                if text:
                    print(text, flush=True)
