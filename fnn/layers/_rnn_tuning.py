"""The recurrent layers' loop-form choice point, ``recurrent.loop`` (:mod:`fnn.tuning`): how the
hand path (``fwd``'s scan and ``bwd``'s reverse scan) walks over time, for ``SimpleRNN``,
``LSTM`` and ``GRU`` with ``loop="auto"`` (the default).

Candidates, side by side (the same maths; :data:`LOOPS` maps each name to the runner's
``split``, the number of independent batch chains per step, :mod:`fnn.layers._rnn_scan`):

- ``"scan"`` (the default, and the form with the tuner off): one ``lax.scan`` step per time
  step, the whole batch in one recurrent matmul and one elementwise chain;
- ``"chains2"``: each step runs the batch as two independent halves, each with its own
  projection, carry, residuals and outputs (two recurrent matmuls and two elementwise chains
  that share no array inside the loops): XLA:CPU's thunk executor runs each half's kernels on
  its own thread (seen in profiles), where one chain leaves a core waiting on the loop's
  elementwise work and on the matmul's thread hand-over. Each half's rows are the same sums in
  the same order; the weight gradients add the halves' products, so results equal the
  default's to rounding.

Not candidates: the scan unrolled by 2, 4 or 8 (``lax.scan(..., unroll=n)``, in the forward
and the reverse scan): equal to rounding but slower at every shape measured, one thread or two
(benchmarks/RESULTS.md, "the recurrent layers' loop form").

Each is timed as the layer's hand forward and backward (``fwd`` then ``bwd``) at the shapes at
hand; the winner is the fastest unless the default is within the tuner's margin. A form can
also be named outright (``LSTM(256, loop="chains2")``), which skips the tuner.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np

from fnn import tuning

__all__ = ["LOOPS", "check_loop", "loop_form"]

LOOPS = {"scan": 1, "chains2": 2}                     # name -> batch chains per step (split)
#: The candidates' revision, part of the cache key: raised when a form's code changes, so that a
#: choice measured on the old code is measured again (2: chains as separate arrays, the LSTM's
#: gate factors formed in the forward step).
FORMS = 2


def check_loop(label: str, loop) -> None:
    """``loop`` must be ``"auto"`` or a name in :data:`LOOPS`, else ``ValueError``."""
    if not isinstance(loop, str) or (loop != "auto" and loop not in LOOPS):
        raise ValueError(f"{label}: loop must be 'auto' or one of {sorted(LOOPS)}, "
                         f"got {loop!r}")


def _threads() -> int:
    """The threads XLA:CPU may use: ``intra_op_parallelism_threads`` of ``XLA_FLAGS`` if set,
    else the CPUs this process may run on."""
    m = re.search(r"intra_op_parallelism_threads=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if m:
        return int(m.group(1))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _offered(batch: int, threads: int) -> list[str]:
    """The forms that apply to a batch of ``batch`` sequences: ``split`` must divide it, and
    more than one chain only helps where XLA has more than one thread (on one, a win would be
    noise: measured 3-9% slower)."""
    return [n for n, split in LOOPS.items() if batch % split == 0 and (split == 1 or threads > 1)]


def _measuring() -> bool:
    """Whether this trace is one of another choice point's candidates, compiled in the tuner's
    measuring thread (a recurrent layer inside ``stack(..., remat="auto")``): measuring here
    would wait on the tuner's lock that the outer measurement holds, so the default is used
    (exact; the layer's own trace outside the measurement chooses for itself)."""
    return tuning.measure.measuring()


def loop_form(cell, loop: str, params, x, mask, reverse: bool, sequences: bool) -> int:
    """Choice point: the ``split`` of the recurrent layer's hand path for input ``x``
    (``[batch, time, in]``), ``mask`` (``lengths`` given or not), ``reverse`` and whether
    ``bwd`` receives every step's output gradient (``sequences``). A named ``loop``: that form;
    ``"auto"``: the tuner's choice on a CPU host, ``"scan"`` with the tuner off."""
    from fnn.layers._rnn_scan import _bwd_scan, _fwd_scan
    if loop != "auto":
        return LOOPS[loop]
    B, T, F = x.shape
    names = _offered(B, _threads())
    if not tuning.enabled() or len(names) < 2 or T < 2 or _measuring():
        return LOOPS["scan"]
    H = params["wh"].shape[0]
    dtype = np.dtype(x.dtype)
    key = {"cell": cell.name, "x": [B, T, F], "hidden": H, "dtype": str(dtype),
           "lengths": mask is not None, "reverse": bool(reverse), "sequences": bool(sequences),
           "xla_flags": os.environ.get("XLA_FLAGS", ""),  # thread settings change the winner
           "forms": FORMS}

    def candidate(name):
        split = LOOPS[name]

        def run(params, x, dys, dcarry, carry0, mask):
            final, hs, emitted = _fwd_scan(cell, params, x, carry0, mask, reverse, split)
            grads, dx, _ = _bwd_scan(cell, params, x, emitted, dys, dcarry, carry0, mask,
                                     reverse)
            return final, hs, grads, dx
        return tuning.Candidate(name, run, value=LOOPS[name])

    def make_args():                    # fresh parameters and data of the traced ones' dtype
        r = np.random.default_rng(0)
        p = jax.tree.map(lambda a: np.asarray(a).astype(dtype),
                         cell.init(jax.random.PRNGKey(0), F, H, dtype))
        normal = lambda *s: r.standard_normal(s).astype(dtype)
        carry = lambda: tuple(normal(B, H) for _ in range(cell.n_carry))
        m = None if mask is None else (np.arange(T)[:, None] < (T - np.arange(B) % T)[None, :]
                                       )[:, :, None]
        return (p, normal(B, T, F), normal(T, B, H) if sequences else None, carry(), carry(), m)
    return tuning.choose("recurrent.loop", key, [candidate(n) for n in names], make_args)
