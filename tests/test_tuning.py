"""The tuner (``fnn.tuning``): its cache key and atomic on-disk entries, verification that rejects
a wrong candidate, the fallback for compiler options a jaxlib does not accept, the off switch,
and the choice points' results equal to the untuned formulation and to float64. Nothing is
timed: every test that turns the tuner on passes a fake timer (fixed seconds per candidate)."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import tuning
from fnn.tuning import cache, options
from fnn.tuning.measure import memo_entries


def fake_timer(seconds: dict):
    """A timer that runs nothing and reports ``seconds[name]`` (missing names: 1 s)."""
    return lambda name, run: seconds.get(name, 1.0)


def no_timer(name, run):
    raise AssertionError(f"timed {name!r} although the choice was cached or the tuner is off")


@pytest.fixture
def tune(tmp_path, monkeypatch):
    """The tuner on with a fresh cache directory and an empty in-process memo."""
    from fnn.tuning import measure
    monkeypatch.setattr(measure, "_MEMO", {})

    def on(seconds, **kw):
        return tuning.settings(enabled=True, timer=fake_timer(seconds), directory=tmp_path, **kw)
    on.dir = tmp_path
    return on


def _args():
    return (np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4),)


def _candidates(wrong_scale=1.0):
    return [tuning.Candidate("exp", lambda x: jnp.exp(x)),
            tuning.Candidate("exp2", lambda x: jnp.exp2(x * np.float32(1 / np.log(2)))),
            tuning.Candidate("wrong", lambda x: jnp.exp(x) * np.float32(wrong_scale))]


# --------------------------------------------------------------------------- cache

def test_the_cache_key_names_machine_jaxlib_point_and_shapes(tune):
    import jaxlib
    k = cache.full_key("conv.kernel_grad", {"x": [64, 28, 28, 32]})
    assert k["point"] == "conv.kernel_grad" and k["key"] == {"x": [64, 28, 28, 32]}
    assert k["jaxlib"] == jaxlib.__version__ and k["cpu"] and k["arch"]
    other = cache.full_key("conv.kernel_grad", {"x": [64, 28, 28, 16]})
    with tuning.settings(directory=tune.dir):
        assert cache.store(k, {"times_ms": {"a": 1.0}}) != cache.store(other, {"times_ms": {}})
        assert cache.load(k)["times_ms"] == {"a": 1.0}
        assert cache.load(cache.full_key("conv.kernel_grad", {"x": [1]})) is None
        assert sorted(os.listdir(tune.dir)) == sorted(os.path.basename(p) for p in (
            cache._path(k), cache._path(other)))            # atomic: no temporary file left
        with open(cache._path(k), "w") as f:               # a torn or foreign file is ignored
            f.write('{"key": ')
        assert cache.load(k) is None
        with open(cache._path(k), "w") as f:
            json.dump({"key": other, "times_ms": {}}, f)
        assert cache.load(k) is None


# --------------------------------------------------------------------------- choose

def test_fastest_verified_candidate_wins_and_is_cached_on_disk(tune, monkeypatch):
    with tune({"exp": 3.0, "exp2": 1.0, "wrong": 0.5}):
        assert tuning.choose("test.exp", {"n": 12}, _candidates(1.01), _args) == "exp2"
    entry = memo_entries()[0]
    assert "wrong" not in entry["times_ms"]                       # planted: 1% off, rejected
    assert "differs from the default" in entry["rejected"]["wrong"]
    from fnn.tuning import measure
    monkeypatch.setattr(measure, "_MEMO", {})                     # a new process: read from disk
    with tuning.settings(enabled=True, timer=no_timer, directory=tune.dir):
        assert tuning.choose("test.exp", {"n": 12}, _candidates(1.01), _args) == "exp2"
        text = tuning.report()
    assert "test.exp" in text and "rejected" in text and "exp2" in text


def test_a_candidate_within_the_margin_keeps_the_default(tune):
    with tune({"exp": 1.0, "exp2": 0.99, "wrong": 2.0}):
        assert tuning.choose("test.margin", {}, _candidates(), _args) == "exp"


def test_off_switch_and_env(tune, monkeypatch):
    with tuning.settings(enabled=False, timer=no_timer, directory=tune.dir):
        assert tuning.choose("test.off", {}, _candidates(), _args) == "exp"
    monkeypatch.setenv("FNN_TUNE", "off")
    with tuning.settings(timer=no_timer, directory=tune.dir):
        assert not tuning.enabled()
        assert tuning.choose("test.off", {}, _candidates(), _args) == "exp"
    assert os.listdir(tune.dir) == []


def test_an_option_set_the_jaxlib_rejects_falls_back(tune, monkeypatch):
    sets = dict(options.OPTION_SETS, bogus={"xla_cpu_no_such_option_in_any_jaxlib": "1"})
    monkeypatch.setattr(options, "OPTION_SETS", sets)
    assert options.accepted("default") and not options.accepted("bogus")
    assert not options.accepted("never defined")
    cands = [tuning.Candidate("exp", lambda x: jnp.exp(x)),
             tuning.Candidate("exp, bogus", lambda x: jnp.exp(x), "bogus")]
    with tune({"exp": 2.0, "exp, bogus": 1.0}):
        assert tuning.choose("test.bogus", {}, cands, _args) == "exp"
    assert "not accepted" in memo_entries()[0]["rejected"]["exp, bogus"]


def test_agree_is_float_rounding_not_more():
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert tuning.agree(x, x + np.float32(1e-6) * x) is None
    assert "max difference" in tuning.agree(x, x * np.float32(1.001))
    assert "non-finite" in tuning.agree(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert "structure" in tuning.agree((x,), [x])


def test_agree_power_loosens_the_bound_for_whole_programs():
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    off = x + np.float32(2e-3) * np.abs(x).max()     # ResNet-18's step moved 2.3e-3 of a leaf
    assert "max difference" in tuning.agree(x, off)                  # sqrt(eps): 3.5e-4
    assert tuning.agree(x, off, power=0.25) is None                  # eps ** 0.25: 1.9e-2
    assert "max difference" in tuning.agree(x, x * np.float32(1.15), power=0.25)   # a wrong kernel
    small = (x, np.float32(1e-3) * x)               # a leaf of small cancelling sums moves more
    moved = (x, small[1] * np.float32(1.04))
    assert "leaf 1" in tuning.agree(small, moved, power=0.25)
    assert tuning.agree(small, moved, power=0.25, whole=True) is None
    assert "leaf 1" in tuning.agree(small, (x, small[1] + np.float32(0.1)), power=0.25, whole=True)


def test_the_budget_counts_from_the_defaults_result(tune):
    """A default slower to compile than the whole budget leaves the others measured: compiling
    it is what the program costs anyway."""
    def slow_exp(x):
        time.sleep(0.3)                      # while tracing: part of the default's compile
        return jnp.exp(x)
    cands = [tuning.Candidate("exp", slow_exp), *_candidates()[1:2]]
    with tune({"exp": 2.0, "exp2": 1.0}, budget=0.2):
        assert tuning.choose("test.slow_default", {}, cands, _args) == "exp2"
    assert not memo_entries()[0]["rejected"]


def test_fnn_tune_report_and_clear(tune, capsys):
    from fnn.cli import main
    with tune({"exp": 3.0, "exp2": 1.0}):
        tuning.choose("test.cli", {"n": 12}, _candidates(), _args)
        assert main(["tune", "--report"]) == 0
        out = capsys.readouterr().out
        assert "machine:" in out and "test.cli" in out and "exp2" in out
        assert main(["tune", "--clear"]) == 0
        assert "deleted 1" in capsys.readouterr().out and os.listdir(tune.dir) == []


def test_the_measuring_thread_keeps_the_callers_thread_local_jax_settings(tune):
    """A choice point reached inside ``with jax.default_matmul_precision(...)`` (a setting local
    to the calling thread) is measured in a thread that has it too; the process's value is
    untouched afterwards."""
    from jax._src import config as jc
    precision = jc.config_states["jax_default_matmul_precision"]
    seen = []

    def timer(name, run):
        seen.append(precision.value)
        return {"exp": 3.0, "exp2": 1.0}.get(name, 2.0)
    before = precision.value
    with tuning.settings(enabled=True, timer=timer, directory=tune.dir):
        with jax.default_matmul_precision("highest"):
            assert tuning.choose("test.local", {"n": 12}, _candidates(), _args) == "exp2"
    assert seen and set(seen) == {"highest"}
    assert precision.value == before
