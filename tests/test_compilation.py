"""The warm start: ``fnn.compilation.enable_cache`` writes compiled programs to a directory and a
second process reads them back (counted by ``CompileTimer``); the ``fnn`` command does it by
default and says how much of its time was compilation; bad directories are named."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fnn import compilation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import jax, jax.numpy as jnp
from fnn import compilation
compilation.enable_cache()                 # FNN_CACHE_DIR
with compilation.CompileTimer() as t:
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    f(jnp.ones((16, 16))).block_until_ready()
print(t.compiles, t.cache_hits)
"""


def _env(cache_dir, **more):
    env = {k: v for k, v in os.environ.items() if k != "FNN_COMPILE_CACHE"}
    return dict(env, FNN_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu", **more)


def test_a_second_process_reads_its_programs_from_the_cache(tmp_path):
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=_env(tmp_path / "cache"),
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    (c1, h1), (c2, h2) = (map(int, r.stdout.split()) for r in runs)
    assert c1 >= 1 and h1 == 0                   # compiled, nothing to read yet
    assert c2 == c1 and h2 == c2                 # every program read back
    assert os.listdir(tmp_path / "cache")


def test_compile_timer_counts_only_while_open():
    f = jax.jit(lambda x: jnp.cos(x) * 3.0 + x.sum())
    with compilation.CompileTimer() as t:
        f(jnp.ones((5, 3))).block_until_ready()
    assert t.compiles >= 1 and 0 < t.seconds <= t.wall
    before = (t.compiles, t.seconds)
    jax.jit(lambda x: jnp.sin(x) - 1.0)(jnp.ones(4)).block_until_ready()
    assert (t.compiles, t.seconds) == before     # closed: a later compile is not counted
    assert t.cache_hits == 0


def test_enable_cache_names_a_directory_it_cannot_create(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"cannot create the cache directory .*file/jax"):
        compilation.enable_cache(blocker / "jax")


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FNN_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation.default_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("FNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "fnn", "jax")


@pytest.mark.slow
def test_fnn_train_twice_reads_the_second_run_from_the_cache(tmp_path):
    cmd = [sys.executable, "-m", "fnn", "train", "xor", "--quick", "--quiet",
           "--out", str(tmp_path / "out")]
    env = _env(tmp_path / "cache")
    # the suite's fast-compile flags (conftest.py) as for the other children: the cache keys
    # include them, and every program of the second run is the first run's
    env["XLA_FLAGS"] = os.environ.get("FNN_TEST_FAST_COMPILE_FLAGS", "")
    lines = []
    for _ in range(2):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        lines.append(r.stdout.splitlines()[-2])     # the summary line before the JSON
    assert re.search(r"of which compiling \d+\.\d s\)", lines[0])      # nothing cached yet
    m = re.search(r"of which compiling \d+\.\d s, (\d+) of (\d+) from the cache", lines[1])
    assert m and int(m[1]) > 0 and int(m[1]) <= int(m[2]), lines[1]
    off = subprocess.run(cmd + ["--no-compile-cache"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert off.returncode == 0 and "from the cache" not in off.stdout
