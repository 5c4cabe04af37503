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
