"""Accelerators without one: compile for a TPU or GPU chip ahead of time and read what the
compiler says a training step costs.

- :mod:`fnn.accelerators.chips`: published peak FLOP/s and HBM bandwidth of TPU and GPU chips.
- :mod:`fnn.accelerators.deviceless`: compile a function for a chip this machine does not have
  (a TPU through libtpu's deviceless topologies: ``pip install 'fnn[tpu]'``).
- :mod:`fnn.accelerators.unroll`: a function's loops written out, so that XLA's cost analysis
  (which counts a loop body once) sees every iteration.
- :mod:`fnn.accelerators.roofline`: FLOPs, bytes accessed, temporary memory, the roofline step
  time and the bound on model-FLOP utilisation of a training step on a chip.

Importing this package loads nothing of libtpu; a TPU target does, when first asked for.
"""
from fnn.accelerators.chips import CHIPS, Chip, chip
from fnn.accelerators.deviceless import abstract, compile_for, sharding, tpu_compiler_available
from fnn.accelerators.roofline import (Cost, Roofline, cost, extrapolate, roofline_of, six_n_d,
                                       step_roofline, table)
from fnn.accelerators.unroll import unrolled

__all__ = ["CHIPS", "Chip", "chip", "abstract", "compile_for", "sharding",
           "tpu_compiler_available", "unrolled", "Cost", "Roofline", "cost", "extrapolate",
           "roofline_of", "step_roofline", "six_n_d", "table"]
