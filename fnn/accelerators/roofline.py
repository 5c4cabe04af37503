"""The roofline of a training step on a chip, from the compiler's own cost analysis.

A step that performs ``F`` FLOPs and moves ``B`` bytes between HBM and the chip cannot finish
faster than ``max(F / peak FLOP/s, B / HBM bandwidth)``: :func:`step_roofline` compiles the
step for the chip (deviceless for a TPU, see :mod:`fnn.accelerators.deviceless`), reads ``F``,
``B`` and the temporary memory XLA assigned, and returns that time, which side bounds it, and the
bound on model-FLOP utilisation it implies, ``MFU ≤ model FLOPs / (time · peak)``.

XLA's ``cost_analysis()`` counts a while-loop body once. So ``F`` and ``B`` are read from the step
with its loops written out (:func:`fnn.accelerators.unroll.unrolled`), and for a model whose depth
is one ``stack`` (a ``lax.scan`` over blocks) from builds of depth 1 and 2 extrapolated linearly,
``cost(L) = cost(1) + (L − 1)·(cost(2) − cost(1))``: exact when every block costs the same, and
two shallow models compile faster than one deep one written out. The temporary memory is the
real program's (loops as they are, full depth), which XLA's buffer assignment measures exactly.

>>> import jax, jax.numpy as jnp
>>> from fnn.accelerators import roofline as rl
>>> w, x = jnp.ones((4, 64, 64)), jnp.ones((8, 64))
>>> step = lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()
>>> looped = rl.cost(step, w, x, unroll=False)         # the scan's body counted once
>>> counted = rl.cost(step, w, x)                      # written out: all 4 matmuls
>>> counted.flops >= 4 * 2 * 8 * 64 * 64 > looped.flops, counted.loops
(True, 0)
>>> r = rl.roofline_of(counted, "v5e", dtype="float32")
>>> r.bound, r.time_s == max(r.compute_s, r.memory_s)
('memory', True)

Model FLOPs (``model_flops=``) are what the model needs, not what the program does
(recomputation, padding): for a transformer :func:`six_n_d`, ``6 · parameters · tokens``; left
out, the step's own FLOPs are used and the bound is on hardware FLOP utilisation.
"""
from __future__ import annotations

import re
import time
from typing import Callable, NamedTuple

import jax

from fnn.accelerators.chips import Chip, chip as _chip
from fnn.accelerators.deviceless import compile_for
from fnn.accelerators.unroll import unrolled

__all__ = ["Cost", "Roofline", "cost", "extrapolate", "roofline_of", "step_roofline", "six_n_d",
           "table"]


class Cost(NamedTuple):
    """What the compiler reports for one program: ``flops``, ``bytes_accessed`` (HBM traffic as
    XLA's cost model counts it), ``temp_bytes`` (temporary buffers in device memory; XLA:TPU
    keeps small ones in on-chip VMEM, which this leaves out), ``loops`` (while loops left
    in the compiled program: each counted once) and ``compile_s`` (seconds compiling)."""
    flops: float
    bytes_accessed: float
    temp_bytes: float
    loops: int
    compile_s: float


class Roofline(NamedTuple):
    """A step on a chip: its cost (``flops``, ``bytes_accessed``, ``temp_bytes``), the times each
    would take at the chip's peak (``compute_s``, ``memory_s``), the roofline step time
    ``time_s`` (their max), ``bound`` (``"compute"`` or ``"memory"``), ``model_flops`` and the
    model-FLOP utilisation bound ``mfu_bound``; ``loops`` left uncounted; ``compile_s``."""
    chip: str
    dtype: str
    flops: float
    bytes_accessed: float
    temp_bytes: float
    compute_s: float
    memory_s: float
    time_s: float
    bound: str
    model_flops: float
    mfu_bound: float
    loops: int
    compile_s: float

    def __str__(self):
        note = f"; {self.loops} loop(s) counted once" if self.loops else ""
        return (f"{self.chip} {self.dtype}: {self.flops:.3g} FLOPs, "
                f"{self.bytes_accessed / 1e9:.3g} GB accessed, temp "
                f"{self.temp_bytes / 2 ** 30:.3g} GiB -> {self.time_s * 1e3:.3g} ms "
                f"({self.bound}-bound; compute {self.compute_s * 1e3:.3g} ms, memory "
                f"{self.memory_s * 1e3:.3g} ms), MFU <= {self.mfu_bound:.2f}{note}")


_WHILE = re.compile(r"\bwhile\(")


def cost(fn: Callable, *args, target="cpu", unroll: bool = True, **kwargs) -> Cost:
    """Compile ``fn(*args, **kwargs)`` for ``target`` (``"cpu"`` or a chip name) and read its
    cost and memory analyses; ``unroll``: with its loops written out first. Array arguments may
    be ``jax.ShapeDtypeStruct``\\ s; non-array keywords must be bound into ``fn``."""
    t0 = time.perf_counter()
    compiled = compile_for(unrolled(fn) if unroll else fn, *args, target=target, **kwargs)
    seconds = time.perf_counter() - t0
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):            # older jaxlibs: one dict per program
        analysis = analysis[0]
    memory = compiled.memory_analysis()
    return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)),
                float(getattr(memory, "temp_size_in_bytes", 0)),
                len(_WHILE.findall(compiled.as_text())), seconds)


def extrapolate(shallow: Cost, deeper: Cost, depth: int, *, depths=(1, 2)) -> Cost:
    """The cost at ``depth`` from costs measured at ``depths`` (default 1 and 2), linear in
    depth: ``shallow + (depth − d₁)·(deeper − shallow)/(d₂ − d₁)`` for FLOPs, bytes and
    temporary memory. ``loops`` is the larger, ``compile_s`` the sum."""
    d1, d2 = depths
    if d2 <= d1:
        raise ValueError(f"extrapolate: depths must increase, got {depths}")
    at = lambda a, b: a + (depth - d1) * (b - a) / (d2 - d1)
    return Cost(at(shallow.flops, deeper.flops),
                at(shallow.bytes_accessed, deeper.bytes_accessed),
                at(shallow.temp_bytes, deeper.temp_bytes), max(shallow.loops, deeper.loops),
                shallow.compile_s + deeper.compile_s)


def roofline_of(c: Cost, chip, *, dtype: str = "bfloat16", model_flops: float | None = None,
                temp_bytes: float | None = None) -> Roofline:
    """The :class:`Roofline` of cost ``c`` on ``chip`` (a name or :class:`Chip`) computing in
    ``dtype`` (picks the peak FLOP/s); ``model_flops`` default ``c.flops``; ``temp_bytes``
    overrides ``c``'s (the real program's, when ``c`` is an unrolled or extrapolated one)."""
    hw: Chip = _chip(chip)
    peak = hw.peak(dtype)
    compute, memory = c.flops / peak, c.bytes_accessed / hw.hbm_bandwidth
    t = max(compute, memory)
    mf = c.flops if model_flops is None else float(model_flops)
    return Roofline(hw.name, str(dtype), c.flops, c.bytes_accessed,
                    c.temp_bytes if temp_bytes is None else float(temp_bytes), compute, memory,
                    t, "compute" if compute >= memory else "memory", mf,
                    mf / (t * peak) if t > 0 else 0.0, c.loops, c.compile_s)


def step_roofline(build: Callable, chip="v5e", *, depth: int | None = None,
                  dtype: str = "bfloat16", model_flops: float | None = None,
                  target=None) -> Roofline:
    """The roofline of the step ``build`` makes, on ``chip``, compiled for ``target`` (default:
    the chip itself; ``"cpu"`` reads the host compiler's counts against the chip's peaks).

    ``build(depth) -> (step, args)``: a step function and its arguments (arrays or
    ``ShapeDtypeStruct``\\ s). With ``depth`` given, FLOPs and bytes come from ``build(1)`` and
    ``build(2)`` with their loops written out, extrapolated to ``depth``; without, from
    ``build(None)`` written out. Temporary memory comes from ``build(depth)`` compiled as it is.
    """
    target = chip if target is None else target
    fn, args = build(depth)
    real = cost(fn, *args, target=target, unroll=False)
    if depth is None:
        counted = cost(fn, *args, target=target)
    else:
        counted = extrapolate(*(cost(*_pair(build(d)), target=target) for d in (1, 2)), depth)
    counted = counted._replace(compile_s=counted.compile_s + real.compile_s)
    return roofline_of(counted, chip, dtype=dtype, model_flops=model_flops,
                       temp_bytes=real.temp_bytes)


def _pair(built):
    fn, args = built
    return (fn, *args)


def six_n_d(params, tokens: int) -> float:
    """Model FLOPs of a training step by the ``6·N·D`` rule (Kaplan et al. 2020): 2 per
    parameter per token forward, 4 backward; ``N`` counts every leaf of ``params`` (arrays or
    ``ShapeDtypeStruct``\\ s), ``D = tokens``."""
    n = sum(int(a.size) if hasattr(a, "size") else 0 for a in jax.tree.leaves(params))
    return 6.0 * n * tokens


def table(rows: dict) -> str:
    """A Markdown table of ``{label: Roofline}``."""
    head = ("| step | chip | dtype | GFLOP | GB accessed | temp GiB | compute ms | memory ms | "
            "roofline ms | bound | MFU ≤ | compile s |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n")
    return head + "".join(
        f"| {k} | {r.chip} | {r.dtype} | {r.flops / 1e9:.4g} | {r.bytes_accessed / 1e9:.4g} | "
        f"{r.temp_bytes / 2 ** 30:.3g} | {r.compute_s * 1e3:.3g} | {r.memory_s * 1e3:.3g} | "
        f"{r.time_s * 1e3:.3g} | {r.bound}{' *' if r.loops else ''} | {r.mfu_bound:.2f} | "
        f"{r.compile_s:.1f} |\n" for k, r in rows.items())
