"""The ``fnn`` command: list, an end-to-end quick training run, gradcheck, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fnn import checkpoint, cli


def test_list_shows_the_bundled_tasks(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "xor " in out and "digits-mlp " in out


def test_python_dash_m_fnn_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "fnn", "list"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "xor" in run.stdout


def test_train_xor_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "xor", "--quick", "--quiet", "--epochs", "2", "--out",
                     str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(lines[-1])
    assert metrics["task"] == "xor" and metrics["epochs"] == 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_loss"])
    assert f"checkpoint and plots in {out}/" in lines[-2]
    assert sorted(os.listdir(out)) == ["xor.safetensors", "xor_boundary.png", "xor_curves.png"]
    ts = checkpoint.load(out / "xor.safetensors")        # a TrainState after 2 epochs of 2 steps
    assert int(ts.step) == 4 and ts.params["0"]["w"].shape == (2, 8)


def test_gradcheck_passes_for_xor(capsys):
    assert cli.main(["gradcheck", "xor", "--directions", "2"]) == 0
    out = capsys.readouterr().out
    assert "hand-derived backprop vs jax.grad" in out and "xor: gradcheck passed" in out


def test_unknown_task_is_an_error(capsys):
    assert cli.main(["train", "no-such-task", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'no-such-task'" in err and "xor" in err
    with pytest.raises(SystemExit):
        cli.main(["train"])                              # argparse: NAME is required


def test_a_broken_task_module_does_not_hide_the_others(tmp_path, monkeypatch, capsys):
    from fnn import tasks
    (tmp_path / "zz_broken_task.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.setattr(tasks, "__path__", list(tasks.__path__) + [str(tmp_path)])
    monkeypatch.setattr(tasks, "_BROKEN", {})
    assert cli.main(["list"]) == 1
    out, err = capsys.readouterr()
    assert "xor " in out and "digits-mlp " in out
    assert "task module 'zz_broken_task' failed to import: RuntimeError: boom at import" in err
    assert cli.main(["train", "zz-broken", "--quick"]) == 2
    assert "'zz_broken_task' failed to import (RuntimeError: boom at import)" in \
        capsys.readouterr().err
