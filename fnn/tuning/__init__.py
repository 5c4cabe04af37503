"""Formulations chosen per machine, by measurement (the models: cuDNN's benchmark mode,
``torch.backends.cudnn.benchmark``).

Some of fnn's computations have several exact formulations whose speed depends on the machine:
the convolution's kernel gradient (XLA's convolution or an im2col matmul) and the compiler
options it is compiled with, ``stack``'s stored residuals, rematerialisation or an unrolled loop,
the recurrent layers' loop form (``recurrent.loop``: the batch as one chain per time step or
as two).
Each such **choice point** is one function that lists its candidates side by side and asks
:func:`choose`. The first time a choice point is compiled for given shapes on a CPU, the tuner

1. compiles each candidate (skipping compiler options the installed jaxlib does not accept:
   :func:`accepted`), runs it on random arguments of those shapes and **checks its result
   against the default candidate's** within floating-point rounding (a candidate that differs
   is never used);
2. times the candidates that agree, in interleaved rounds (a few seconds per choice at most:
   ``settings(budget=...)``), and takes the fastest, if it beats the default by 3%;
3. keeps the choice in memory and in an on-disk cache keyed by CPU model, jax/jaxlib version and
   the shapes (:mod:`fnn.tuning.cache`, ``~/.cache/fnn/tune``), so later processes skip 1-2.

``FNN_TUNE=off`` (or :func:`enable` ``(False)``) turns it off: every choice point then uses its
default, the formulation fnn used before the tuner. Off the CPU (GPU, TPU) the defaults are
used too, and a program lowered for another platform (``jax.export`` with ``platforms=[...]``)
carries that platform's formulation: choice points branch with ``jax.lax.platform_dependent``
at lowering time, never on the host's default backend. ``fnn tune --report`` lists the choices
made on this machine.

Compiler options are set per function, never process-wide: :func:`jit` (used by ``fit``'s
compiled step and epoch) compiles a function with the option set that is fastest over its own
choice points; every other ``jax.jit`` in the process is unaffected.
"""
from __future__ import annotations

from fnn.tuning import cache
from fnn.tuning._settings import default_dir, default_timer, enable, enabled, settings
from fnn.tuning.measure import Candidate, agree, choose, measured, memo_entries
from fnn.tuning.options import OPTION_SETS, TunedJit, accepted, in_effect, jit

__all__ = ["Candidate", "choose", "measured", "agree", "enabled", "enable", "settings",
           "default_timer", "default_dir", "OPTION_SETS", "accepted", "in_effect", "jit",
           "TunedJit", "report", "cache"]


def report(all_machines: bool = False) -> str:
    """The choices in the on-disk cache, one block per choice point and key: the candidates'
    median times, which one is used, and why any was rejected. Only this machine's and jaxlib's
    entries unless ``all_machines``."""
    here = cache.machine()
    rows = [f"fnn tuning: {'on' if enabled() else 'off'} (FNN_TUNE); cache {cache.directory()}",
            f"machine: {here['cpu']} ({here['arch']}), jax {here['jax']}, jaxlib "
            f"{here['jaxlib']}"]
    seen = {cache.canonical(e["key"]): e for e in cache.entries()}
    for e in memo_entries():
        seen.setdefault(cache.canonical(e["key"]), e)
    shown = 0
    for e in sorted(seen.values(), key=lambda e: cache.canonical(e["key"])):
        k = e["key"]
        if not all_machines and any(k.get(f) != here[f] for f in here):
            continue
        shown += 1
        times, opts = e.get("times_ms", {}), e.get("options", {})
        by_set = {}
        for name, t in times.items():
            s = opts.get(name, "default")
            if s not in by_set or t < times[by_set[s]]:
                by_set[s] = name
        rows.append(f"\n{k['point']}  {k.get('key')}")
        if all_machines:
            rows.append(f"  machine: {k.get('cpu')}, jaxlib {k.get('jaxlib')}")
        for name, t in sorted(times.items(), key=lambda kv: kv[1]):
            s = opts.get(name, "default")
            mark = f"  <- fastest with options {s!r}" if by_set.get(s) == name else ""
            rows.append(f"  {name:34s} {t:9.3f} ms{mark}")
        for name, why in e.get("rejected", {}).items():
            rows.append(f"  {name:34s} rejected: {why}")
    if not shown:
        rows.append("\n(no choices measured yet on this machine)")
    return "\n".join(rows)
