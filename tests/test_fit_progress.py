"""What fit shows as it trains, on stderr: one plain line per epoch, every epoch, where stderr
is not a terminal (a log file, a pipe, CI); a tqdm bar where it is; ReduceLROnPlateau's cuts
in one line each."""
import re
import sys

import jax
import pytest

from helpers import xor_data

from fnn import losses, optim, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))


@pytest.mark.parametrize("progress", ["auto", "lines"])
def test_not_a_terminal_gets_one_plain_line_per_epoch_on_stderr(progress, capsys):
    """capsys's stderr is not a terminal: the default ("auto") used to print nothing there,
    and "lines" only every tenth of the run."""
    x, y = xor_data(32)
    res = train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=25, batch_size=16,
                    val_data=(x, y), key=jax.random.PRNGKey(0),
                    **({} if progress == "auto" else {"loop": train.Loop(progress=progress)}))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 25
    for e, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch {e}/25 loss \S+ accuracy \S+ val_loss (\S+) "
                            rf"val_accuracy \S+ lr 0\.05", line), line
        assert float(line.split()[7]) == pytest.approx(res.history["val_loss"][e - 1],
                                                       rel=1e-3)


def test_a_terminal_gets_the_bar_and_false_gets_nothing(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    x, y = xor_data(32)
    kw = dict(epochs=3, batch_size=16, key=jax.random.PRNGKey(0))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    train.fit(MODEL, CE, optim.adam(0.05), (x, y), **kw)
    err = capsys.readouterr().err
    assert "3/3" in err and "epoch 1/3" not in err            # tqdm's bar, not lines
    train.fit(MODEL, CE, optim.adam(0.05), (x, y), loop=train.Loop(progress=False), **kw)
    assert capsys.readouterr() == ("", "")


def test_reduce_lr_on_plateau_says_each_cut_in_one_line(capsys):
    x, y = xor_data(48)
    kw = dict(epochs=8, batch_size=16, key=jax.random.PRNGKey(0), val_data=(x, 1 - y),
              loop=train.Loop(progress=False))
    res = train.fit(MODEL, CE, optim.adam(0.05), (x, y),
                    callbacks=[train.ReduceLROnPlateau(factor=0.5, patience=2)], **kw)
    lr = res.history["lr"]
    cuts = [(e + 1, a, b) for e, (a, b) in enumerate(zip(lr, lr[1:])) if b != a]
    said = capsys.readouterr().err.strip().splitlines()
    assert cuts and len(said) == len(cuts)
    for (epoch, a, b), line in zip(cuts, said):
        assert line == (f"ReduceLROnPlateau: epoch {epoch}: val_loss has not improved for 2 "
                        f"epochs; learning rate {a:.4g} -> {b:.4g}")
    train.fit(MODEL, CE, optim.adam(0.05), (x, y),
              callbacks=[train.ReduceLROnPlateau(factor=0.5, patience=2, verbose=False)], **kw)
    assert capsys.readouterr().err == ""


def test_the_terminal_bar_moves_inside_an_epoch_with_the_running_loss(monkeypatch):
    """On a terminal the epoch's steps are reported from inside the compiled epoch (every
    40 // 20 = 2 steps in the first epoch) and after each streamed chunk of 4; each report's
    loss is the mean of the batch losses so far, against plain optax SGD step by step."""
    pytest.importorskip("tqdm")
    import numpy as np
    import optax
    from fnn.train import progress
    x, y = xor_data(160)
    params = MODEL.init(jax.random.PRNGKey(0), (4, 2))[0]
    state = MODEL.init(jax.random.PRNGKey(0), (4, 2))[1]
    opt, p, s, losses_ = optax.sgd(0.1), params, None, []
    s = opt.init(p)
    vg = jax.jit(jax.value_and_grad(lambda p, xb, yb: CE(MODEL.apply(p, state, xb)[0], yb)))
    for i in range(0, 160, 4):
        value, g = vg(p, x[i:i + 4], y[i:i + 4])
        u, s = opt.update(g, s, p)
        p, _ = optax.apply_updates(p, u), losses_.append(float(value))
    running = np.cumsum(losses_) / np.arange(1, 41)
    seen = []
    monkeypatch.setattr(progress.Progress, "step", lambda self, done, loss:
                        seen.append((done, loss)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 160, 4)]
    for data, want in (((x, y), list(range(2, 40, 2))),
                       (lambda epoch: iter(batches), list(range(4, 41, 4)))):
        seen.clear()
        res = train.fit(MODEL, CE, optim.sgd(0.1), data, epochs=1, batch_size=4,
                        train_state=train.create_train_state(MODEL, optim.sgd(0.1),
                                                             jax.random.PRNGKey(1), (4, 2),
                                                             params=params),
                        loop=train.Loop(shuffle=False, chunk=4))
        assert [d for d, _ in seen] == want
        np.testing.assert_allclose([v for _, v in seen], running[np.array(want) - 1],
                                   rtol=1e-10)
        assert res.history["loss"][0] == pytest.approx(running[-1], rel=1e-10)
    assert not progress._LISTENING                  # each fit's display left the list


def _count_thread_launches(monkeypatch) -> list:
    """The terminal bar on (tqdm needed), and a list that grows by one per epoch launched from
    the helper thread."""
    pytest.importorskip("tqdm")
    from fnn.train.launch_thread import Pending
    launched, real = [], Pending.__init__
    monkeypatch.setattr(Pending, "__init__",
                        lambda self, *a, **k: (launched.append(1), real(self, *a, **k))[1])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    return launched


def test_epochs_launched_ahead_from_a_helper_thread_train_the_same(monkeypatch):
    """With the bar the epoch holds a host callback and runs in the call that launches it, so
    the next epoch is launched ahead of the bookkeeping (validation, callbacks) from a helper
    thread: the run equals the same one with nothing launched ahead, bit for bit."""
    import numpy as np
    from fnn.train import loops
    x, y = xor_data(64)
    launched = _count_thread_launches(monkeypatch)

    def run():
        return train.fit(MODEL, CE, optim.adam(0.05), (x, y), epochs=4, batch_size=8,
                         val_data=(x[:16], y[:16]), key=jax.random.PRNGKey(0),
                         callbacks=[train.EarlyStopping(10)])
    a = run()
    assert len(launched) == 3                         # epochs 2-4, each launched ahead
    monkeypatch.setattr(loops.InMemory, "ahead", lambda self, ts: None)
    b = run()
    assert len(launched) == 3
    for k in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert a.history[k] == b.history[k]
    for u, v in zip(jax.tree.leaves(a.train_state), jax.tree.leaves(b.train_state)):
        np.testing.assert_array_equal(u, v)


def test_no_helper_thread_under_a_thread_local_jax_setting(monkeypatch):
    """``jax.default_matmul_precision`` holds in the thread that set it only: under it no epoch
    is launched from the helper thread (it would be compiled again, without the setting)."""
    from fnn.train.launch_thread import Pending
    x, y = xor_data(32)
    launched = _count_thread_launches(monkeypatch)
    assert Pending.traces_alike()
    with jax.default_matmul_precision("highest"):
        assert not Pending.traces_alike()
        train.fit(MODEL, CE, optim.sgd(0.1), (x, y), epochs=3, batch_size=8,
                  val_data=(x[:8], y[:8]), key=jax.random.PRNGKey(0))
    assert not launched
