"""Resume after a crash: a training process killed with SIGKILL mid-save and mid-epoch, then
resumed, ends with the same bytes as a run never interrupted (params, optimizer state, key,
history, early stopping's best params and a reduce-on-plateau callback's state included); and
a run crashed between its callbacks and the backup resumes every callback's state (the CSV log,
the best and last-N checkpoints)."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from helpers import CrashAt, assert_trees_close

from fnn import checkpoint, data, losses, optim, train
from fnn.layers import Dense, Tanh, serial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 8

# The run (XOR, a small MLP; validation labels flipped so that the plateau callback fires and
# early stopping's best epoch is an early one): shared by the children and the reference.
RUN = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_threefry_partitionable", False)
    from fnn import data, losses, optim, train
    from fnn.layers import Dense, Tanh, serial

    def run(directory=None):
        x, y = data.xor(64, noise=0.2, seed=0, dtype=np.float64)
        xv, yv = data.xor(32, noise=0.2, seed=1, dtype=np.float64)
        model = serial(Dense(8), Tanh(), Dense(2))
        return train.fit(model, losses.softmax_cross_entropy_with_integer_labels,
                         optim.adam(0.05), (x, y), epochs=%d, batch_size=16,
                         val_data=(xv, 1 - yv), key=jax.random.PRNGKey(3),
                         callbacks=[train.ReduceLROnPlateau(factor=0.5, patience=1),
                                    train.EarlyStopping(100)]
                         + ([train.BackupAndRestore(directory)] if directory else []),
                         loop=train.Loop(progress=False))
""" % EPOCHS)

CHILD = RUN + textwrap.dedent("""
    import os, signal, sys
    mode, directory, out = sys.argv[1:4]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "kill-mid-save":            # the 3rd save dies with its temporary file written
        real, calls = os.replace, []
        def replace(src, dst):
            calls.append(dst)
            if dst.endswith("fit_state.safetensors") and len(calls) == 3:
                die()
            real(src, dst)
        os.replace = replace
    if mode == "kill-mid-epoch":           # dies with epoch 6's compiled call in flight
        import fnn.train.loops as loops
        real_launch = loops.memory_launch
        def memory_launch(run_epoch, sizes, ts, *rest, **kw):
            out = real_launch(run_epoch, sizes, ts, *rest, **kw)
            if int(ts.step) == 5 * 4:
                die()
            return out
        loops.memory_launch = memory_launch
    result = run(directory)
    from fnn import checkpoint
    checkpoint.save(out, result.train_state, metadata={"history": __import__("json").dumps(
        {k: v for k, v in result.history.items() if k != "time"})})
""")


def _child(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(script), mode, str(tmp_path / "run"),
                           str(tmp_path / "final.safetensors")], env=env, capture_output=True,
                          text=True, timeout=120)


def _saved_epoch(tmp_path):
    meta = checkpoint.read_metadata(tmp_path / "run" / "fit_state.safetensors")
    return json.loads(meta["fit"])["epoch"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_save_and_mid_epoch_then_resume_is_bit_identical(tmp_path):
    p = _child(tmp_path, "kill-mid-save")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert _saved_epoch(tmp_path) == 2                   # the torn 3rd save left no trace...
    assert any(f.name.endswith(".tmp") for f in (tmp_path / "run").iterdir())  # ...but its tmp
    p = _child(tmp_path, "kill-mid-epoch")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert _saved_epoch(tmp_path) == 4       # epoch 6 is launched before epoch 5 is saved
    p = _child(tmp_path, "finish")
    assert p.returncode == 0, p.stderr[-2000:]

    namespace = {}
    exec(RUN, namespace)                                 # the same run, never interrupted
    want = namespace["run"]()
    got = checkpoint.load(tmp_path / "final.safetensors", like=want.train_state)
    assert_trees_close(got, want.train_state, rtol=0, atol=0, what="resumed")   # names the leaf
    raw = lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) \
        else a
    bits = lambda t: [(a.dtype, a.tobytes()) for a in map(np.asarray, jax.tree.leaves(
        jax.tree.map(raw, t)))]
    assert bits(got) == bits(want.train_state)      # and bit for bit: dtypes, -0.0, NaN payloads
    history = json.loads(checkpoint.read_metadata(tmp_path / "final.safetensors")["history"])
    assert history == {k: v for k, v in want.history.items() if k != "time"}
    assert len(set(want.history["lr"])) > 1              # the callback's state mattered



def test_resume_restores_every_callbacks_state(tmp_path):
    """A 5-epoch run crashes in epoch 3's callbacks and is resumed by a fresh process's worth
    of fresh callback objects: the CSV log has each epoch exactly once, and ModelCheckpoint's
    best (an early epoch: the validation labels are flipped) and its last two files are those
    of a run never interrupted: the backup restored the callbacks' states, not only the train
    state."""
    x, y = data.xor(64, noise=0.2, seed=0, dtype=np.float64)
    model = serial(Dense(8), Tanh(), Dense(2))

    def run(out, crash_at=None, backup=True):
        cbs = [train.ModelCheckpoint(out / "ck", keep_last=2), train.CSVLogger(out / "log.csv"),
               CrashAt(crash_at)] + ([train.BackupAndRestore(out / "run")] if backup else [])
        return train.fit(model, losses.softmax_cross_entropy_with_integer_labels,
                         optim.adam(0.05), (x, y), epochs=5, batch_size=16, val_data=(x, 1 - y),
                         key=jax.random.PRNGKey(3), callbacks=cbs,
                         loop=train.Loop(progress=False))

    with pytest.raises(RuntimeError, match="crash after epoch 3"):
        run(tmp_path / "resumed", crash_at=3)
    resumed = run(tmp_path / "resumed")
    straight = run(tmp_path / "straight", backup=False)
    best = int(np.argmin(straight.history["val_loss"])) + 1
    assert best <= 2                        # the best epoch is before the crash: its state matters

    def rows(out):
        with open(out / "log.csv") as f:
            return [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(f)]
    got, want = rows(tmp_path / "resumed"), rows(tmp_path / "straight")
    assert [r["epoch"] for r in got] == ["1", "2", "3", "4", "5"]
    assert got == want
    files = lambda out: sorted(p.name for p in (out / "ck").iterdir())
    assert files(tmp_path / "resumed") == files(tmp_path / "straight") == [
        "best.safetensors", "epoch_0004.safetensors", "epoch_0005.safetensors"]
    for name in ("best.safetensors", "epoch_0005.safetensors"):
        a, b = (tmp_path / d / "ck" / name for d in ("resumed", "straight"))
        assert checkpoint.read_metadata(a)["epoch"] == checkpoint.read_metadata(b)["epoch"]
        assert_trees_close(checkpoint.load(a, like=straight.train_state),
                           checkpoint.load(b, like=straight.train_state), rtol=0, atol=0)
    assert checkpoint.read_metadata(tmp_path / "resumed" / "ck" / "best.safetensors")[
        "epoch"] == str(best)
    assert_trees_close(resumed.train_state, straight.train_state, rtol=0, atol=0)
