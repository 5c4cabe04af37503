"""Published peak throughput and memory bandwidth of accelerator chips, for roofline estimates.

Each :class:`Chip` holds the vendor's published dense peaks (no sparsity) per chip:

=========  ================  ================  =========  ==========  ==========================
chip       bfloat16 FLOP/s   float32 FLOP/s    HBM GB/s   HBM bytes   compiled for
=========  ================  ================  =========  ==========  ==========================
``v4``     275e12            275e12 (1)        1200       32 GiB      TPU topology ``v4:1x1x1`` (2)
``v5e``    197e12            197e12 (1)        819        16 GiB      TPU topology ``v5e:1x1``
``v5p``    459e12            459e12 (1)        2765       95 GiB      TPU topology ``v5p:1x1x1``
``v6e``    918e12            918e12 (1)        1640       32 GiB      TPU topology ``v6e:1x1``
``A100``   312e12            156e12 (3)        2039       80 GiB      a local CUDA GPU
``H100``   989e12            494e12 (3)        3350       80 GiB      a local CUDA GPU
=========  ================  ================  =========  ==========  ==========================

Sources: Google Cloud's TPU system-architecture pages (v4, v5e, v5p, v6e/Trillium) and NVIDIA's
A100 (SXM4 80 GB) and H100 (SXM5) datasheets. (1) JAX's default matmul precision on TPU runs a
float32 matmul as one bfloat16 pass on the MXU, at the bfloat16 rate (``precision="highest"``
takes several passes). (2) libtpu describes a v4 chip as two TensorCores; the program is compiled
for one and the chip's peaks (both cores, as megacore runs them) are used. (3) TF32 tensor-core
rate, JAX's default for float32 matmuls on Ampere and Hopper.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Chip", "CHIPS", "chip"]


class Chip(NamedTuple):
    """One accelerator chip's published peaks: ``flops`` (FLOP/s by compute dtype name),
    ``hbm_bandwidth`` (bytes/s), ``hbm_bytes``; ``platform`` (``"tpu"`` or ``"gpu"``) and, for a
    TPU, the ``topology`` name libtpu compiles for without the hardware."""
    name: str
    flops: dict
    hbm_bandwidth: float
    hbm_bytes: float
    platform: str
    topology: str | None = None

    def peak(self, dtype: str = "bfloat16") -> float:
        """Peak FLOP/s for matmuls computed in ``dtype`` (``"bfloat16"``, ``"float32"``; float16
        runs at the bfloat16 rate)."""
        key = {"float16": "bfloat16"}.get(str(dtype), str(dtype))
        if key not in self.flops:
            raise ValueError(f"Chip {self.name}: no published peak for {dtype!r}; "
                             f"known: {sorted(self.flops)}")
        return self.flops[key]


_GIB = 2 ** 30
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", {"bfloat16": 275e12, "float32": 275e12}, 1200e9, 32 * _GIB, "tpu", "v4:1x1x1"),
    Chip("v5e", {"bfloat16": 197e12, "float32": 197e12}, 819e9, 16 * _GIB, "tpu", "v5e:1x1"),
    Chip("v5p", {"bfloat16": 459e12, "float32": 459e12}, 2765e9, 95 * _GIB, "tpu", "v5p:1x1x1"),
    Chip("v6e", {"bfloat16": 918e12, "float32": 918e12}, 1640e9, 32 * _GIB, "tpu", "v6e:1x1"),
    Chip("A100", {"bfloat16": 312e12, "float32": 156e12}, 2039e9, 80 * _GIB, "gpu"),
    Chip("H100", {"bfloat16": 989e12, "float32": 494e12}, 3350e9, 80 * _GIB, "gpu"),
)}


def chip(name) -> Chip:
    """The :class:`Chip` called ``name`` (a :class:`Chip` passes through); ``ValueError`` naming
    the known chips otherwise."""
    if isinstance(name, Chip):
        return name
    if name not in CHIPS:
        raise ValueError(f"fnn.accelerators: unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[name]
