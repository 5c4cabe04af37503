"""Test configuration: float64 everywhere, no implicit rank promotion, and a cheaper XLA:CPU
code generator."""
import os

# The suite is compile-bound (hundreds of small programs, each run once or twice): XLA:CPU's
# LLVM at -O0 and its older elemental fusion emitter compile the same HLO ~2-4x faster (a
# TransformerBlock's forward+backward: 1.45 s -> 0.3 s). Same HLO optimization passes, same IEEE
# arithmetic (no fast-math either way); only machine-code quality drops, which no test measures.
# Set before JAX creates its CPU backend; flags the caller already passes are left alone.
# (Subprocesses inherit them; one that clears XLA_FLAGS passes FAST_COMPILE_FLAGS itself.)
from helpers import FAST_COMPILE_FLAGS   # imports jax, which starts no backend yet

_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags] + [f for f in FAST_COMPILE_FLAGS
                                               if f.split("=")[0] not in _flags]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# Each jitted random draw compiles ~10x faster on XLA:CPU with the non-partitionable threefry.
jax.config.update("jax_threefry_partitionable", False)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
