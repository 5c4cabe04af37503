"""pyproject.toml is honest: the runtime dependencies are jax and jaxlib; importing every fnn
module pulls in neither optax nor chex (they are test/bench extras)."""
import os
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")          # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import importlib, pkgutil, sys
import fnn
for m in pkgutil.walk_packages(fnn.__path__, "fnn."):
    if m.name != "fnn.__main__":
        importlib.import_module(m.name)
print(sorted(n for n in ("optax", "chex") if n in sys.modules))
"""


def test_runtime_dependencies_are_jax_only():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert names == ["jax", "jaxlib"]
    test_extra = " ".join(project["optional-dependencies"]["test"])
    assert "optax" in test_extra and "chex" in test_extra


def test_importing_every_fnn_module_needs_neither_optax_nor_chex():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
