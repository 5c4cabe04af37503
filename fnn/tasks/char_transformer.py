"""Task ``char-transformer``: a character-level GPT on Python's own documentation text.

Text: ``pydoc_data.topics.topics`` joined in sorted key order (~465k characters), read by
``fnn.tasks.char_lstm.load_text``: the first 90% trains, the last 10% validates, the vocabulary
is every character of the whole text — the same text, split and vocabulary as ``char-lstm``, so
the two validation bits/char compare directly (the LSTM reads the validation text as long
streams with a carried state; here each window starts from scratch, so context is shorter).
Non-overlapping windows of ``SEQ + 1`` characters give ``(input, next-character target)``
pairs. The model is
``fnn.models.GPT`` (learned positions, pre-norm blocks, tied embedding), trained by
``fnn.train.fit`` with the hand-derived backward (``fnn.models.value_and_grad``: one forward
keeping every layer's residuals, then the hand rules; blocks unrolled, which at this depth
compiles quickly and is at least as fast as the scan, see ``benchmarks/RESULTS.md``), AdamW with
warmup and cosine decay, gradients clipped at norm 1.

Writes to ``out``: ``char_transformer_curves.png`` (validation bits/char per epoch),
``char_transformer_attention.png`` (every head's attention map for a sampled sequence),
``char_transformer_sample.txt`` (texts sampled with the KV cache) and
``char_transformer.safetensors``.
"""
from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fnn import checkpoint, optim, train
from fnn.layers.attention import dot_product_attention
from fnn.layers.dense import dense
from fnn.layers.norm import layer_norm
from fnn.models import GPT, lm_loss, sample, value_and_grad
from fnn.tasks import Task, char_lstm, artifact_dir, backup_callbacks, default, register

SEQ, BATCH, D, HEADS, DEPTH, MLP = 64, 32, 96, 4, 3, 384
EPOCHS, LR = 4, 3e-3
PROMPTS = ("The ", "def ", "For ", "In a")


def load_text():
    """``(train_text, val_text, alphabet)``: char-lstm's text, split at 90%."""
    text = char_lstm.load_text()
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:], sorted(set(text))


def windows(ids, seq):
    """Non-overlapping ``(x, y)`` windows of ``seq`` ids, ``y`` shifted by one."""
    n = (len(ids) - 1) // seq
    x = np.asarray(ids[:n * seq]).reshape(n, seq)
    y = np.asarray(ids[1:n * seq + 1]).reshape(n, seq)
    return jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)


def model(vocab, quick=False):
    if quick:
        return GPT(vocab, 32, 2, 1, 64, SEQ)
    return GPT(vocab, D, HEADS, DEPTH, MLP, SEQ)


def attention_maps(net, params, state, tokens, heads):
    """Attention probabilities ``[depth, heads, t, t]`` of one sequence ``tokens: [1, t]``,
    recomputed layer by layer from the trained params (pre-norm, learned positions)."""
    t = tokens.shape[1]
    h = params["embed"]["w"][tokens] + params["pos"]["w"][None, :t]
    block = dict(net.children)["blocks"].children[0][1]         # the stacked TransformerBlock
    depth = jax.tree.leaves(params["blocks"])[0].shape[0]
    maps = []
    for i in range(depth):
        p = jax.tree.map(lambda a: a[i], params["blocks"])
        s = jax.tree.map(lambda a: a[i], state["blocks"])
        a = p["attn"]
        z = layer_norm(h, a["norm"]["scale"], a["norm"]["offset"])
        q, k = (dense(z, a["mha"][n]["w"], a["mha"][n]["b"]) for n in "qk")
        q, k = (u.reshape(1, t, heads, -1) for u in (q, k))
        # P = softmax over allowed keys: attention of one-hot values gives P itself
        eye = jnp.broadcast_to(jnp.eye(t)[None, :, None, :], (1, t, heads, t))
        maps.append(dot_product_attention(q, k, eye, causal=True)[0].transpose(1, 0, 2))
        h = block.apply(p, s, h)[0]
    return jnp.stack(maps)


def _plots(history, maps, text, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:                                 # matplotlib is an optional extra
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["epoch"], history["train_bpc"], "o-", label="train")
    ax.plot(history["epoch"], history["val_bpc"], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="bits per character", title="char-transformer")
    ax.legend()
    fig.savefig(os.path.join(out, "char_transformer_curves.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    depth, heads, t, _ = maps.shape
    fig, axes = plt.subplots(depth, heads, figsize=(2.6 * heads, 2.6 * depth), squeeze=False)
    for (i, j), ax in np.ndenumerate(axes):
        ax.imshow(np.asarray(maps[i, j]), cmap="viridis")
        ax.set_title(f"layer {i} head {j}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(repr(text[:48]) + "…", fontsize=8)
    fig.savefig(os.path.join(out, "char_transformer_attention.png"), dpi=100,
                bbox_inches="tight")
    plt.close(fig)


def run(*, epochs=None, lr=None, batch_size=None, seed=0, out="out", quiet=False, quick=False,
        resume=False, precision=None) -> dict:
    """Train, report validation bits/char per epoch, sample; returns ``val_bpc`` and
    ``train_bpc`` (last epoch, bits per character), ``val_loss`` (the same in nats per
    character, as the progress line shows it), ``history`` (per-epoch ``train_bpc``/
    ``val_bpc``), ``samples`` (one text per prompt in ``PROMPTS``, 64 characters: the context
    the positions were trained on) and ``epochs``. Unless ``quiet``, ends with
    :func:`summary` on stderr."""
    epochs = default(epochs, 1 if quick else EPOCHS)
    lr = default(lr, LR)
    batch = default(batch_size, BATCH)
    train_text, val_text, alphabet = load_text()
    if quick:
        train_text, val_text = train_text[:20_000], val_text[:4_000]
    index = {c: i for i, c in enumerate(alphabet)}
    train_xy = windows([index[c] for c in train_text], SEQ)
    val_xy = windows([index[c] for c in val_text], SEQ)
    net = model(len(alphabet), quick)
    steps = epochs * math.ceil(train_xy[0].shape[0] / batch)
    schedule = optim.schedules.warmup_cosine(0.0, lr, max(1, min(100, steps // 10)), steps + 1,
                                             lr / 10)
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adamw(schedule, weight_decay=0.01, mask=optim.not_named(
                          "b", "scale", "offset")))
    progress = False if quiet else (True if sys.stderr.isatty() else "lines")
    result = train.fit(net, lm_loss, opt, train_xy, epochs=epochs, batch_size=batch,
                       val_data=val_xy, key=jax.random.PRNGKey(seed),
                       # the unrolled hand step is built for the float32 model; under a
                       # precision policy fit's manual path runs the wrapped model's hand rules
                       step=train.Step(grad="manual" if precision else
                                       value_and_grad(net, unroll=True)),
                       metrics=(), loop=train.Loop(drop_last=True, progress=progress),
                       callbacks=backup_callbacks(resume, out), precision=precision)
    ts, hist = result.train_state, result.history
    history = {"epoch": hist["epoch"], "train_bpc": [l / math.log(2) for l in hist["loss"]],
               "val_bpc": [l / math.log(2) for l in hist["val_loss"]]}
    prompt = jnp.asarray([[index[c] for c in p] for p in PROMPTS], jnp.int32)    # (4, 4)
    ids = sample(net, ts.params, ts.state, jax.random.PRNGKey(seed + 1), prompt,
                 SEQ - prompt.shape[1], temperature=0.8, top_k=20)
    texts = ["".join(alphabet[i] for i in row) for row in np.asarray(ids)]
    out = artifact_dir(out)                             # process 0 writes the files
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "char_transformer_sample.txt"), "w") as f:
        f.write("\n\n".join(texts) + "\n")
    checkpoint.save(os.path.join(out, "char_transformer.safetensors"), ts.params)
    maps = attention_maps(net, ts.params, ts.state, ids[:1], 2 if quick else HEADS)
    _plots(history, maps, texts[0], out)
    m = {"val_bpc": history["val_bpc"][-1], "train_bpc": history["train_bpc"][-1],
         "val_loss": hist["val_loss"][-1], "history": history, "samples": texts,
         "epochs": len(history["epoch"])}
    if not quiet:
        print(summary(m, out), file=sys.stderr, flush=True)
    return m


def summary(m, out="out") -> str:
    """The readable end of a run (what ``fnn train char-transformer`` shows on stderr after the
    epoch lines): bits per character, the same validation loss in the progress line's unit
    (``loss``/``val_loss`` there are ``lm_loss``: nats per character), and the samples.

    >>> print(summary({"val_bpc": 2.0, "train_bpc": 2.5, "val_loss": 2.0 * math.log(2),
    ...                "epochs": 4, "samples": ["The end"]}))
    char-transformer, 4 epochs: validation 2.000 bits/char, train 2.500 bits/char
      (val_loss 1.386 nats/char on the epoch lines = 2.000 bits/char × ln 2)
    samples (temperature 0.8, top-k 20; all in out/char_transformer_sample.txt):
      'The end'
    """
    lines = [f"char-transformer, {m['epochs']} epoch{'s' * (m['epochs'] != 1)}: validation "
             f"{m['val_bpc']:.3f} bits/char, train {m['train_bpc']:.3f} bits/char",
             f"  (val_loss {m['val_loss']:.3f} nats/char on the epoch lines = "
             f"{m['val_bpc']:.3f} bits/char × ln 2)",
             f"samples (temperature 0.8, top-k 20; all in "
             f"{os.path.join(out, 'char_transformer_sample.txt')}):"]
    return "\n".join(lines + [f"  {t!r}" for t in m["samples"]])


def train_metrics(**kwargs) -> dict:
    """:func:`run` as ``fnn train char-transformer`` calls it: the final numbers only
    (``val_bpc``, ``train_bpc`` in bits per character; ``val_loss`` in nats per character, the
    unit of the progress line; ``epochs``), so the command's summary line and JSON object hold
    no per-epoch lists; the history and samples are in ``run``'s result and the files."""
    m = run(**kwargs)
    return {k: m[k] for k in ("val_bpc", "train_bpc", "val_loss", "epochs")}


def problem(seed=0):
    """Two 16-character windows and a fresh 1-block GPT, for ``fnn gradcheck``. Rotary positions:
    with learned ones the key bias's gradient is exactly zero (it shifts every logit of a row
    alike), which a per-leaf relative comparison cannot tell from an error."""
    train_text, _, alphabet = load_text()
    index = {c: i for i, c in enumerate(alphabet)}
    x, y = windows([index[c] for c in train_text[:40]], 16)
    net = GPT(len(alphabet), 16, 2, 1, 32, 16, positions="rope")
    params, state, _ = net.init(jax.random.PRNGKey(seed), x[:2].shape)
    return net, lm_loss, params, state, x[:2], y[:2]


register(Task("char-transformer", "character-level GPT on pydoc topics, val bits/char, "
              "KV-cache sampling (~3 min)", train_metrics, problem))
