"""A stand-in for fnn.train.epoch's ``Runner`` whose every number is worked on the host, for the
unit tests of fnn.train.loops (no model, no compilation).

The train state is ``TrainState({"w": w}, {"s": 0}, (m,), step, key)`` (float32 ``w`` and
``m``, a uint32 pair as the key). The data's first leaf, read as rows ``(loss, update)``, is one
step per row: a step whose loss or state ``w`` is not finite — or, for a runner that judges the
update (``strict``), whose update is not — is bad: counted, not applied, and the run stops
there. Otherwise ``w += update`` in float32 (so ``3e38 + 3e38`` overflows from finite numbers:
the state goes bad a step before a step is judged bad), ``m += 1``, ``step += 1``,
``key += 1``; each call adds one more to the key (an epoch's shuffle split, made even when it
runs no step). Each applied step adds to the sums ``loss · 2``, ``|update| · 2``, 2 examples and
one to its only stat. The report is ``flat`` itself (``unpack`` is the identity)."""
import jax
import jax.numpy as jnp
import numpy as np

from fnn.train.epoch import Report, Sums
from fnn.train.step import TrainState


def state(w=0.0, step=0, m=0.0, key=0):
    return TrainState({"w": jnp.float32(w)}, {"s": jnp.float32(0.0)}, (jnp.float32(m),),
                      jnp.int32(step), jnp.array([0, key], jnp.uint32))


def rows(*pairs):
    """In-memory data ``(x, y)``: ``x`` the rows ``(loss, update)``, ``y`` zeros."""
    x = np.asarray(pairs, np.float32).reshape(-1, 2)
    return jnp.asarray(x), jnp.zeros(len(x), jnp.float32)


def sums(loss=0.0, grad_norm=0.0, examples=0.0, stat=0.0):
    return Sums(np.float64(loss), np.float64(grad_norm), np.float64(examples),
                (np.float64(stat),))


class FakeRunner:
    def __init__(self, strict=True, donates=False, ticks=False, strict_runner=None):
        self.judge_update, self.donates, self.ticks = strict, donates, ticks
        self._strict = strict_runner
        self.calls = []                   # (ts given, the limit as given)

    def strict(self):
        return self if self._strict is None else self._strict

    def unpack(self, flat):
        return flat

    def __call__(self, ts, data, limit):
        self.calls.append((ts, limit))
        n = int(limit[0] if isinstance(limit, tuple) else limit)
        assert n >= 0, f"a negative limit {n}"
        pairs = np.asarray(jax.tree.leaves(data)[0], np.float32).reshape(-1, 2)
        w, m = np.float32(ts.params["w"]), float(ts.opt_state[0])
        loss = gn = ex = 0.0
        i, bad = 0, False
        with np.errstate(all="ignore"):
            while i < min(n, len(pairs)):
                lo, u = pairs[i]
                i += 1
                if not (np.isfinite(lo) and np.isfinite(w)
                        and (np.isfinite(u) or not self.judge_update)):
                    bad = True
                    break
                w, m = np.float32(w + u), m + 1
                loss, gn, ex = loss + 2 * float(lo), gn + 2 * abs(float(u)), ex + 2
        applied = i - 1 if bad else i
        step, key = int(ts.step), np.asarray(ts.key)
        if self.donates:                  # as DONATE: params, state, opt_state
            for a in jax.tree.leaves((ts.params, ts.state, ts.opt_state)):
                a.delete()
        new = state(w, step + applied, m, int(key[1]) + 1 + applied)
        report = Report(i, bad, sums(loss, gn, ex, applied), 0.5, float("nan"))
        nxt = 0 if bad else limit
        if isinstance(limit, tuple):
            nxt = (0 if bad else limit[0], limit[1])
        return new, report, nxt


class BareRunner:
    """A runner with neither ``donates`` nor ``strict`` (fnn.train.loops then takes it as
    donating, and as its own strict runner); it runs as a non-donating :class:`FakeRunner`."""

    def __init__(self):
        self.inner = FakeRunner()
        self.calls = self.inner.calls

    def __call__(self, ts, data, limit):
        return self.inner(ts, data, limit)

    def unpack(self, flat):
        return flat
