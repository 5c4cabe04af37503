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
    assert int(ts.step) == 4 and ts.params["hidden"]["w"].shape == (2, 8)


def test_train_prints_its_epoch_lines_to_the_stream_help_names(tmp_path, capsys):
    """--help (and docs/getting-started.md) say progress goes to stderr: every epoch's line is
    there, and stdout holds only the summary line and the JSON line."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "progress goes to stderr" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["train", "xor", "--quick", "--epochs", "3", "--out",
                     str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert [ln.split()[1] for ln in err.splitlines() if ln.startswith("epoch ")] == \
        ["1/3", "2/3", "3/3"]
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "epoch " not in out and json.loads(lines[1])["epochs"] == 3


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


# --------------------------------------------------------------------------- issue 18 (3, 4, 9, 10)

class _Recorder:
    """A stand-in task whose ``train`` records its keywords instead of training."""

    def __init__(self):
        self.calls = []
        self.name = "fake"

    def train(self, **kw):
        self.calls.append(kw)
        return {"test_accuracy": 1.0}


@pytest.fixture
def fake_task(monkeypatch):
    from fnn import tasks
    rec = _Recorder()
    real_get = tasks.get
    monkeypatch.setattr(tasks, "get", lambda name: rec if name == "fake" else real_get(name))
    return rec


def test_train_help_lists_tasks_batch_size_and_the_json_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())            # argparse wraps to the terminal
    assert "char-lstm, char-transformer, digits-cnn, digits-mlp, xor" in out
    assert "--batch-size" in out and "--resume" in out
    assert "one JSON object on the last line" in out and '{"task": "digits-cnn"' in out


def test_underscore_spelling_suggests_the_task(capsys):
    assert cli.main(["train", "digits_mlp", "--quick"]) == 2
    assert "unknown task 'digits_mlp' (did you mean 'digits-mlp'?)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, why", [
    ("--epochs", "-3", "expected a positive integer, got '-3'"),
    ("--epochs", "0", "expected a positive integer, got '0'"),
    ("--batch-size", "0", "expected a positive integer, got '0'"),
    ("--lr", "-1", "expected a finite learning rate >= 0, got '-1'"),
    ("--lr", "nan", "expected a finite learning rate >= 0, got 'nan'"),
    ("--lr", "inf", "expected a finite learning rate >= 0, got 'inf'"),
])
def test_bad_values_are_refused_before_training(fake_task, capsys, flag, value, why):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "fake", flag, value])
    assert e.value.code == 2 and fake_task.calls == []
    assert f"argument {flag}: {why}" in capsys.readouterr().err


def test_zero_lr_and_options_reach_the_task_as_given(fake_task):
    assert cli.main(["train", "fake", "--lr", "0", "--batch-size", "7", "--quiet"]) == 0
    assert cli.main(["train", "fake", "--epochs", "5", "--resume", "--out", "o"]) == 0
    first, second = fake_task.calls
    assert first["lr"] == 0.0 and first["lr"] is not None and first["batch_size"] == 7
    assert first["epochs"] is None and first["resume"] is False
    assert second["epochs"] == 5 and second["resume"] is True and second["out"] == "o"


class _Stop(Exception):
    pass


@pytest.fixture
def fit_calls(monkeypatch):
    """``fnn.train.fit`` replaced by a recorder that stops the task right there."""
    from fnn import train
    calls = []

    def fake_fit(*args, **kw):
        calls.append((args, kw))
        raise _Stop
    monkeypatch.setattr(train, "fit", fake_fit)
    return calls


@pytest.mark.parametrize("name", ["xor", "digits-mlp", "digits-cnn"])
def test_tasks_keep_zero_lr_and_batch_size_and_pass_resume(fit_calls, tmp_path, name):
    from fnn import tasks
    task = tasks.get(name)
    with pytest.raises(_Stop):
        task.train(lr=0.0, batch_size=16, quick=True, quiet=True, out=str(tmp_path))
    with pytest.raises(_Stop):
        task.train(epochs=1, quick=True, quiet=True, out=str(tmp_path), resume=True)
    import jax.numpy as jnp
    from fnn import optim, train
    (args, plain), (_, resumed) = fit_calls
    lr = optim.learning_rate(args[2].init({"w": jnp.zeros(1)}))   # the optimizer's own rate
    assert float(lr) == 0.0 and plain["batch_size"] == 16
    backups = lambda kw: [cb for cb in kw.get("callbacks", ())
                          if isinstance(cb, train.BackupAndRestore)]
    assert not backups(plain)
    (backup,) = backups(resumed)
    assert backup.resume and backup.directory == str(tmp_path / "ckpt")


def test_digits_cnn_selects_on_a_validation_split_not_the_test_set(fit_calls):
    from fnn import data, tasks
    with pytest.raises(_Stop):
        tasks.get("digits-cnn").train(quick=True, quiet=True)
    (args, kw), = fit_calls
    (xt, yt), (xv, yv) = args[3], kw["val_data"]
    (x, y), (x_test, _) = data.load_digits(image=True)
    assert len(xt) + len(xv) == 256 and len(xv) == 26
    rows = lambda a: sorted(map(bytes, np.asarray(a).reshape(len(a), -1)))
    assert rows(np.concatenate([xt, xv])) == rows(x[:256])      # carved from the training set
    assert not set(rows(xv)) & set(rows(x_test))
    from fnn import train
    (stopper,) = [cb for cb in kw["callbacks"] if isinstance(cb, train.EarlyStopping)]
    assert stopper.restore_best and stopper.rule is not None


def test_resume_continues_from_the_checkpoint_dir(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["train", "xor", "--quick", "--quiet", "--out", out]
    assert cli.main(common + ["--epochs", "1"]) == 0
    assert cli.main(common + ["--epochs", "2", "--resume"]) == 0
    assert os.listdir(os.path.join(out, "ckpt"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 2


SPY = """
import json, sys
import jax
import fnn.train.fitting as F
from fnn import cli
seen, real = [], F.on_mesh
F.on_mesh = lambda dist, ts: (seen.append(dict(dist.mesh.shape)), real(dist, ts))[1]
rc = cli.main(["train", "xor", "--quick", "--quiet", "--epochs", "2", "--devices", "2",
               "--out", sys.argv[1]])
print(json.dumps({"rc": rc, "meshes": seen, "devices": jax.device_count()}))
"""


def test_train_on_two_devices_in_one_process_or_two(tmp_path):
    """``--devices 2`` gives the CPU backend two devices (a fresh process: the count is fixed
    when JAX starts) and every ``fit`` of the task a ("data": 2) mesh. The same command under
    ``fnn.sharding.launch`` as 2 processes × 1 device (jax.distributed, gloo) trains the same
    model to 1e-6; only process 0 prints and writes files."""
    from fnn.sharding.launch import launch_local
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # no device count given
    env["XLA_FLAGS"] = os.environ.get("FNN_TEST_FAST_COMPILE_FLAGS", "")   # see conftest.py
    run = subprocess.run([sys.executable, "-c", SPY, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    *_, one, spy = run.stdout.strip().splitlines()
    got = json.loads(spy)
    assert got["rc"] == 0 and got["devices"] == 2
    assert got["meshes"] and all(m == {"data": 2} for m in got["meshes"])

    out, log = tmp_path / "two", tmp_path / "two.txt"
    cmd = [sys.executable, "-m", "fnn", "train", "xor", "--quick", "--quiet", "--epochs", "2",
           "--out", str(out)]
    with open(log, "w") as f:                  # both processes' output, interleaved
        codes = launch_local(cmd, 2, cpu_devices=1, timeout=300, env=env, stdout=f,
                             stderr=subprocess.STDOUT)
    text = log.read_text()
    assert codes == [0, 0], text[-3000:]
    lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"task"')]
    assert len(lines) == 1, text[-3000:]                 # process 1 printed no result
    two, ref = lines[0], json.loads(one)
    assert two.keys() == ref.keys()
    for k in ("test_loss", "test_accuracy", "truth_table_accuracy"):
        assert abs(two[k] - ref[k]) < 1e-6, (k, two, ref)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "run"))


# --------------------------------------------------------------------------- fnn doctor

def test_doctor_command(capsys):
    assert cli.main(["doctor", "xor", "--steps", "100", "--lr", "0.03"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fnn doctor xor: 0 errors")
    assert "hand-derived gradient matches jax.grad and finite differences" in out
    assert cli.main(["doctor", "no-such-task"]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err


def test_doctor_exits_non_zero_on_an_error(monkeypatch, capsys, rng):
    import jax

    from fnn import losses, tasks
    from fnn.layers import Dense, serial
    x, y = rng.normal(size=(12, 4)), rng.integers(0, 3, size=12)
    y[0] = -1
    model, ce = serial(Dense(3)), losses.softmax_cross_entropy_with_integer_labels
    broken = tasks.Task("broken-labels", "a label out of range", None,
                        lambda seed=0: (model, ce, *model.init(jax.random.PRNGKey(0), x.shape)[:2],
                                        x, y))
    monkeypatch.setitem(tasks._TASKS, "broken-labels", broken)
    assert cli.main(["doctor", "broken-labels"]) == 1
    out = capsys.readouterr().out
    assert "fnn doctor broken-labels: 1 error" in out and "label -1 at index (0,)" in out
