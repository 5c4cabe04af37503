"""Test configuration: float64 everywhere and no implicit rank promotion."""
import os

# The suite's time is mostly XLA:CPU compiling many small programs; LLVM's optimization level 0
# compiles them about a third faster (the same HLO, the same maths; measured on
# test_residuals + test_gpt: 71 -> 49 CPU-s). Set before JAX starts its backend.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

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
