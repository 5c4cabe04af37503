"""Test configuration: float64 everywhere, no implicit rank promotion, and a cheaper XLA:CPU
code generator."""
import os
import subprocess
import sys

from helpers import FAST_COMPILE_FLAGS   # imports jax, which starts no backend yet


def _fast_compile():
    """The suite is compile-bound (hundreds of small programs, each run once or twice): XLA:CPU's
    LLVM at -O0 with its elemental fusion emitter compiles the same HLO 2-4x faster (a
    TransformerBlock's forward+backward: 1.45 s -> 0.3 s). Same HLO optimization passes, same IEEE
    arithmetic (no fast-math either way); only machine-code quality drops, which no test
    measures. Flags the caller already passes are left alone; an XLA that does not know a flag
    aborts the process, so a child process tries them first (~1 s) and they are skipped there.
    ``FNN_TEST_XLA_DEFAULTS=1`` runs the suite with XLA's defaults."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in flags]
    if os.environ.get("FNN_TEST_XLA_DEFAULTS") or not extra:
        return
    env = dict(os.environ, XLA_FLAGS=" ".join(extra), JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env,
                           capture_output=True, timeout=300)
    if probe.returncode == 0:        # set before JAX creates its CPU backend; children inherit
        os.environ["XLA_FLAGS"] = " ".join([flags] + extra).strip()
        os.environ["FNN_TEST_FAST_COMPILE_FLAGS"] = " ".join(extra)


_fast_compile()
# The fnn command turns JAX's persistent compilation cache on; the suite's in-process and child
# CLI runs leave it off (a process-wide setting, and no files in the user's cache directory).
os.environ.setdefault("FNN_COMPILE_CACHE", "off")
# The tuner (fnn.tuning) would time formulations: the suite times nothing. Off, every choice point
# takes its default; tests that turn it on pass a fake timer and a temporary cache directory.
os.environ.setdefault("FNN_TUNE", "off")

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
