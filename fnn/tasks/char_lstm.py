"""Task ``char-lstm``: a character-level LSTM language model on the text Python ships.

Data: every help topic of ``pydoc_data.topics`` (Python's own reference text, ~465k characters)
joined in sorted order; the last 10% is the validation text (a fixed split), the vocabulary is
every character of the whole text.

Model: ``Embedding(V, 32) → LSTM(H, stateful=True) → Dense(V)`` logits for the next character.

Training is truncated backpropagation through time: the training text is cut into ``B``
parallel streams and each step takes the next ``T`` characters of every stream. The LSTM's
carry flows on from one window to the next (it lives in the model ``state``), while gradients
stop at the window's edge. Gradients are the layers' hand-derived ones (``grad="manual"``: the
LSTM's own BPTT), with Adam and global-norm clipping at 1.

Reports validation bits per character after every epoch (the model read over the validation
streams with its own carried state; ``log2 V ≈ 6.7`` bits is a uniform guess), writes
``char_lstm_curve.png``, ``char_lstm.safetensors`` and ``char_lstm_sample.txt`` (text sampled at
a temperature) to ``out``.
"""
from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checkpoint, losses, optim, train
from fnn.layers import LSTM, Dense, Embedding, lstm_cell, scan_rnn, serial
from fnn.tasks import Task, artifact_dir, backup_callbacks, default, register

LOSS = losses.softmax_cross_entropy_with_integer_labels
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- data

def load_text() -> str:
    """Python's help topics (``pydoc_data.topics``), joined in sorted order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def encode(text: str):
    """``(ids int32 [len], chars)``: each character's index in the sorted vocabulary."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], np.int32), chars


def windows(ids, batch: int, window: int):
    """Cut ``ids`` into ``batch`` contiguous streams and those into windows of ``window`` steps.

    Returns ``(x, y)`` of shape ``[n_windows · batch, window]`` with ``y`` the next characters,
    ordered window-major: rows ``i·batch ... (i+1)·batch - 1`` are window ``i`` of streams
    ``0 ... batch-1``, so unshuffled minibatches of ``batch`` rows continue each stream.
    """
    per = (len(ids) - 1) // (batch * window) * window           # steps per stream
    if per == 0:
        raise ValueError(f"char-lstm: text of {len(ids)} characters is too short for "
                         f"{batch} streams of {window}-step windows")
    x = ids[:batch * per].reshape(batch, per)
    y = ids[1:batch * per + 1].reshape(batch, per)
    cut = lambda a: a.reshape(batch, per // window, window).transpose(1, 0, 2).reshape(-1, window)
    return cut(x), cut(y)


# --------------------------------------------------------------------------- model

def model(vocab: int, hidden: int, embed: int = 32):
    """Characters → embedding → stateful LSTM → next-character logits."""
    return serial(("embed", Embedding(vocab, embed)), ("lstm", LSTM(hidden, stateful=True)),
                  ("out", Dense(vocab)))


def bits_per_char(net, params, state0, x, y, batch: int):
    """Mean cross-entropy in bits of the windows ``x, y`` (window-major rows), reading every
    stream with its carried state from ``state0``: one compiled scan over the windows."""
    xw = x.reshape(-1, batch, x.shape[1])                        # (windows, batch, T)
    yw = y.reshape(-1, batch, y.shape[1])

    def body(state, xy):
        logits, state = net.apply(params, state, xy[0])
        return state, LOSS(logits, xy[1], reduction="sum")
    _, nll = jax.lax.scan(body, state0, (xw, yw))
    return jnp.sum(nll) / (x.size * LN2)


def sample(params, prompt_ids, length: int, temperature: float, key):
    """Read ``prompt_ids`` with the LSTM op, then draw ``length`` characters one at a time from
    ``softmax(logits / temperature)``, feeding each back in (the cell op in a ``lax.scan``)."""
    emb, cell, out = params["embed"]["w"], params["lstm"], params["out"]
    _, carry = scan_rnn(lstm_cell, cell, emb[jnp.asarray(prompt_ids)][None])
    logits0 = carry[0] @ out["w"] + out["b"][None, :]

    def step(state, k):
        carry, logits = state
        c = jax.random.categorical(k, logits / temperature, axis=-1)   # (1,)
        carry, h = lstm_cell(cell, carry, emb[c])
        return (carry, h @ out["w"] + out["b"][None, :]), c[0]
    _, ids = jax.lax.scan(step, (carry, logits0), jax.random.split(key, length))
    return ids


# --------------------------------------------------------------------------- the story

def config(quick=False, hidden=None, batch=None, window=None) -> dict:
    """The run's sizes: characters read (``None``: all), LSTM width, streams, window length
    (``quick``: the small run); an argument given overrides its default."""
    if quick:
        return dict(chars=24_000, hidden=hidden or 32, batch=batch or 8, window=window or 32)
    return dict(chars=None, hidden=hidden or 128, batch=batch or 32, window=window or 64)


def run(*, epochs=None, lr=None, batch_size=None, seed=0, out="out", quiet=False, quick=False,
        resume=False, precision=None, hidden=None, batch=None, window=None, temperature=0.6, sample_length=400,
        prompt="The ") -> dict:
    """Train (default: 4 epochs, hidden 128, 32 streams × 64-step windows; ``quick``: 1 epoch
    of a small model on 24k characters), report validation bits/char per epoch; returns
    ``val_bits_per_char``, ``train_bits_per_char``, ``epochs``, ``seconds``; the sampled text
    is in ``out/char_lstm_sample.txt``."""
    t_start = time.perf_counter()
    cfg = config(quick, hidden, default(batch, batch_size), window)   # batch_size: streams
    epochs, lr = default(epochs, 1 if quick else 4), default(lr, 3e-3)
    ids, chars = encode(load_text()[:cfg["chars"]])
    cut = int(0.9 * len(ids))
    B, T = cfg["batch"], cfg["window"]
    (x, y), (vx, vy) = windows(ids[:cut], B, T), windows(ids[cut:], B, T)
    net = model(len(chars), cfg["hidden"])
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(lr))
    ts = train.create_train_state(net, opt, jax.random.PRNGKey(seed), (B, T))
    state0 = ts.state                                            # zero carry
    val_bpc = jax.jit(lambda p: bits_per_char(net, p, state0, vx, vy, B))
    history = {"epoch": [0], "bits_per_char": [math.nan],
               "val_bits_per_char": [float(val_bpc(ts.params))]}
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    say(f"char-lstm: {len(ids):,} characters, vocabulary {len(chars)}, {len(x) // B} steps of "
        f"{B}×{T} per epoch, hidden {cfg['hidden']}; before training: validation "
        f"{history['val_bits_per_char'][0]:.3f} bits/char")

    def report(epoch, state, logs):
        history["epoch"].append(epoch)
        history["bits_per_char"].append(logs["loss"] / LN2)
        history["val_bits_per_char"].append(float(val_bpc(state.params)))
        say(f"epoch {epoch}: train {history['bits_per_char'][-1]:.3f}, "
            f"val {history['val_bits_per_char'][-1]:.3f} bits/char")

    progress = False if quiet else (True if sys.stderr.isatty() else "lines")
    result = train.fit(net, LOSS, opt, (x, y), train_state=ts, epochs=epochs, batch_size=B,
                       metrics=(), step=train.Step(grad="manual"),
                       loop=train.Loop(shuffle=False, drop_last=True, progress=progress),
                       callbacks=[report, *backup_callbacks(resume, out)], precision=precision)
    ts = result.train_state
    text = _write(artifact_dir(out), ts, history, chars, prompt, sample_length, temperature, seed)
    say(f"sampled at temperature {temperature}:\n{text}")
    return {"val_bits_per_char": history["val_bits_per_char"][-1],
            "train_bits_per_char": history["bits_per_char"][-1], "epochs": epochs,
            "seconds": round(time.perf_counter() - t_start, 1)}


def _write(out, ts, history, chars, prompt, length, temperature, seed):
    os.makedirs(out, exist_ok=True)
    checkpoint.save(os.path.join(out, "char_lstm.safetensors"), ts)
    index = {c: i for i, c in enumerate(chars)}
    prompt_ids = [index[c] for c in prompt if c in index] or [0]
    drawn = sample(ts.params, prompt_ids, length, temperature, jax.random.PRNGKey(seed + 1))
    text = prompt + "".join(chars[int(i)] for i in drawn)
    with open(os.path.join(out, "char_lstm_sample.txt"), "w") as f:
        f.write(text + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:                                          # plots are an optional extra
        return text
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["epoch"][1:], history["bits_per_char"][1:], marker=".", label="train")
    ax.plot(history["epoch"], history["val_bits_per_char"], marker=".", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits per character")
    ax.set_title("char-LSTM on pydoc_data.topics")
    ax.legend()
    fig.savefig(os.path.join(out, "char_lstm_curve.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return text


def problem(seed=0):
    """Two 8-character windows and a small freshly initialised model (nonzero carried state),
    for ``fnn gradcheck``."""
    ids, chars = encode(load_text()[:2000])
    x, y = windows(ids, 2, 8)
    net = model(len(chars), 8, embed=4)
    params, state, _ = net.init(jax.random.PRNGKey(seed), (2, 8))
    state = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 1),
                                                           a.shape, a.dtype), state)
    return net, LOSS, params, state, jnp.asarray(x[:2]), jnp.asarray(y[:2])


register(Task("char-lstm", "character LSTM on pydoc topics, truncated hand BPTT with carried "
              "state, val bits/char (~2.0 in ~3 min)", run, problem))
