"""``fnn doctor TASK --roofline CHIP``: a bundled task's training step against a chip's roofline.

Compiles the step for the chip where this process can (a TPU chip with libtpu installed, a GPU
chip with a CUDA backend), else with the host compiler and says so: the host's counts of FLOPs
and bytes then stand in for the chip compiler's (same program, different fusion decisions).
"""
from __future__ import annotations

import sys

__all__ = ["compile_target", "print_task_roofline"]


def compile_target(chip) -> tuple[str, str]:
    """``(target, note)``: what to compile for to read ``chip``'s costs — the chip itself when
    this process can, else ``"cpu"`` — and a note saying why when it cannot."""
    import jax

    from fnn.accelerators.chips import chip as _chip
    from fnn.accelerators.deviceless import tpu_compiler_available
    c = _chip(chip)
    if c.platform == "tpu":
        if tpu_compiler_available():
            return c.name, ""
        return "cpu", "libtpu is not installed (pip install 'fnn[tpu]'): "
    try:
        jax.devices("gpu")
        return c.name, ""
    except RuntimeError:
        return "cpu", "no CUDA GPU backend in this process: "


def print_task_roofline(name: str, chip: str) -> int:
    """Print task ``name``'s hand and autodiff steps' rooflines on ``chip``; the exit status (2
    for an unknown task or chip)."""
    from fnn.accelerators import task_steps
    try:
        target, note = compile_target(chip)
    except ValueError as e:
        print(f"fnn: {e}", file=sys.stderr)
        return 2
    if name not in task_steps.NAMES:
        print(f"fnn: no roofline for task {name!r}; known: {', '.join(task_steps.NAMES)}",
              file=sys.stderr)
        return 2
    print(f"fnn doctor {name} --roofline {chip}: one training batch, float32")
    if note:
        print(f"  {note}FLOPs and bytes counted by the host compiler against {chip}'s peaks")
    for kind in ("hand", "autodiff"):
        print(f"  {kind:8s} {task_steps.roofline(name, chip, kind, target=target)}")
    return 0
