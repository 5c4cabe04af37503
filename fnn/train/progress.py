"""Progress display and early stopping for :func:`fnn.train.fit`."""
from __future__ import annotations

import math
import sys

import jax

class _Progress:
    """A tqdm bar over epochs with the latest metrics (``"auto"``: only on a terminal), or
    printed lines (``"lines"``: the first and last epoch and every tenth of the run), or
    nothing. ``close(reason)`` reports why training stopped early."""

    def __init__(self, progress, epochs):
        self.bar, self.lines, self.epochs, self.pending = None, progress == "lines", epochs, None
        if progress and not self.lines:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=epochs, unit="epoch", desc="fit", file=sys.stderr,
                                disable=None if progress == "auto" else False)
            except ImportError:
                self.lines = progress is True

    def update(self, logs):
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
            self.bar.close()
            if reason and not self.bar.disable:
                print(reason, file=sys.stderr)
        elif self.lines:
            for text in (self.pending, reason):
                if text:
                    print(text, flush=True)


class _EarlyStop:
    """Early stopping on ``monitor`` with :func:`fnn.regularizers.early_stopping` (a pure,
    jittable rule); watches ``(params, state)`` so that the best of both can be restored."""

    def __init__(self, rule, min_delta, monitor, ts):
        if isinstance(rule, int):
            from fnn.regularizers import early_stopping
            rule = early_stopping(rule, min_delta)
        self.update, self.monitor = jax.jit(rule.update), monitor
        self.state = rule.init((ts.params, ts.state))

    def __call__(self, epoch, ts, logs):
        """Feed one epoch; return the reason to stop, or ``None``."""
        if self.monitor not in logs:
            raise ValueError(f"fit: cannot monitor {self.monitor!r}; this run logs "
                             f"{sorted(logs)}")
        value = logs[self.monitor] * (-1 if self.monitor.endswith("accuracy") else 1)
        self.state = self.update(self.state, value, (ts.params, ts.state))
        if bool(self.state.stop):
            return (f"fit: early stopping after epoch {epoch}: {self.monitor} has not improved "
                    f"for {int(self.state.wait)} epochs")
        return None

    def finish(self, ts, restore):
        """``(train_state, best epoch)``, with the best params and state if ``restore``."""
        if restore and int(self.state.step) > 0:
            p, s = self.state.best_params
            ts = ts._replace(params=p, state=s)
        return ts, int(self.state.best_step) + 1


def _nonfinite_message(epoch, step, start):
    return (f"fit: non-finite loss or gradient at epoch {epoch}, step {step} (update "
            f"{step - start + 1} of the epoch); training stopped, keeping the state from "
            f"before that step")
