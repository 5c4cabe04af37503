"""Attention you can read: a one-layer transformer learns to reverse a sequence, and its attention maps show how.

The lesson's transformer section, small enough to look inside. Sequences of ``T`` random tokens
from a vocabulary of ``V``; the target is the same sequence reversed. The model is a token
embedding plus learned positions, one single-head self-attention layer and a dense read-out::

    h = E[x] + P,   q, k, v = h W_q, h W_k, h W_v,   A = softmax(q kᵀ / √d),   logits = (A v) W_o W

No recurrence, no convolution: the output at position ``i`` is a weighted average of the values
of all positions, and the weights ``A[i, j]`` (the attention map, each row sums to 1) are all the
model has to route token ``T−1−i`` to position ``i``. Trained with Adam on fresh batches, the
hand-derived backward throughout, several seeds (one compiled function). At initialization every
row is close to uniform (``1/T``); after training each query puts almost all its weight on the
mirrored key ``j = T−1−i``: the anti-diagonal. Printed per seed: token accuracy on a fresh batch,
the fraction of queries whose largest weight is on the mirrored key, and the mean weight there.
Figure: ``OUT/attention_maps.png`` (the map at init, the trained map of two sequences, the mean
over a batch).

    python examples/attention_maps.py [--steps 400] [--seeds 4] [--out out] [--quick] [--seed 0]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, losses, optim
from fnn.layers import Dense, Embedding, MultiHeadAttention, PositionalEmbedding, serial
from fnn.plot import save as save_figure

LOSS = losses.softmax_cross_entropy_with_integer_labels


def model(vocab, t, d):
    """``[batch, t]`` token ids → ``[batch, t, vocab]`` logits: embedding + positions, one
    single-head attention layer, a dense read-out."""
    return serial(Embedding(vocab, d), PositionalEmbedding(t), MultiHeadAttention(1),
                  Dense(vocab))


def task(key, n, t, vocab):
    """``x: [n, t]`` uniform random tokens, target ``x`` reversed along time."""
    x = jax.random.randint(key, (n, t), 0, vocab)
    return x, x[:, ::-1]


def attention(params, x):
    """The attention map ``A: [batch, t, t]`` (query × key) of the single head, recomputed from
    the params: ``softmax(q kᵀ / √d)`` with ``q, k`` the projections of ``E[x] + P``."""
    h = params["0"]["w"][x] + params["1"]["w"][None, :x.shape[1]]
    a = params["2"]
    q, k = (h @ a[n]["w"] + a[n]["b"][None, None, :] for n in "qk")
    scores = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(q.shape[-1])
    return jax.nn.softmax(scores, axis=-1)


def evaluate(net, p, x, y):
    """Token accuracy on ``(x, y)``, the fraction of queries whose largest attention weight is on
    the mirrored key, the mean weight on it, the maps of the first two sequences and the mean map
    over ``x``."""
    t = x.shape[1]
    mirror = t - 1 - np.arange(t)
    state = {str(i): {} for i in range(4)}                  # no layer here has state
    pred = jnp.argmax(net.apply(p, state, x)[0], axis=-1)
    a = attention(p, x)
    return {"accuracy": jnp.mean(pred == y),
            "mirror_hit": jnp.mean(jnp.argmax(a, axis=-1) == mirror[None, :]),
            "mirror_weight": jnp.mean(a[:, np.arange(t), mirror]),
            "maps": a[:2], "mean_map": jnp.mean(a, axis=0)}


def train(keys, steps, batch, lr, vocab, t, d, x, y):
    """Adam on fresh batches, one model per key (training and evaluation in one compile).
    Returns the trained and initial params (leading axis: seed), the loss per step
    ``[seeds, steps]`` and :func:`evaluate` on ``(x, y)`` of the trained and the initial model."""
    net = model(vocab, t, d)
    opt = optim.adam(lr)
    vg = backprop.value_and_grad(net, LOSS)

    def one(key):
        params, state, _ = net.init(key, (batch, t))

        def step(carry, i):
            p, o = carry
            xb, yb = task(jax.random.fold_in(key, i), batch, t, vocab)
            (value, _), g = vg(p, state, xb, yb)
            u, o = opt.update(g, o, p)
            return (optim.apply_updates(p, u), o), value
        (p, _), vals = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return p, params, vals, evaluate(net, p, x, y), evaluate(net, params, x, y)
    one = jax.jit(one)                      # compiled once, run per seed (cheaper than vmap)
    runs = [one(k) for k in keys]
    out = jax.tree.map(lambda *a: np.stack([np.asarray(u) for u in a]), *runs)
    return out


def plot(maps, titles, tokens, path):
    """One heat map per panel, query rows × key columns; a panel of one sequence labels the keys
    with its input tokens and the queries with the tokens they must output (input reversed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps), figsize=(2.7 * len(maps), 3.0))
    t = maps[0].shape[0]
    for ax, m, title, tok in zip(axes, maps, titles, tokens):
        ax.imshow(np.asarray(m), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        if tok is None:
            ax.set_xticks(range(t), range(t), fontsize=7)
            ax.set_yticks(range(t), range(t), fontsize=7)
            ax.set_xlabel("key position j", fontsize=8)
        else:
            ax.set_xticks(range(t), [str(int(v)) for v in tok], fontsize=7)
            ax.set_yticks(range(t), [str(int(v)) for v in tok[::-1]], fontsize=7)
            ax.set_xlabel("input token (key)", fontsize=8)
    axes[0].set_ylabel("output token (query)", fontsize=8)
    axes[-1].set_ylabel("query position i", fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="shorter sequences, fewer steps")
    args = ap.parse_args(argv)
    vocab, t, d, batch = (6, 6, 16, 32) if args.quick else (10, 8, 32, 64)
    if args.quick:
        args.steps, args.seeds = min(args.steps, 150), min(args.seeds, 2)
    key = jax.random.PRNGKey(args.seed)
    keys = jax.random.split(key, args.seeds)
    x = np.random.default_rng(10_000 + args.seed).integers(0, vocab, (256, t))  # held out
    x, y = jnp.asarray(x, jnp.int32), jnp.asarray(x[:, ::-1], jnp.int32)
    params, init, vals, trained, at_init = train(keys, args.steps, batch, args.lr, vocab, t, d,
                                                 x, y)
    print(f"reverse {t} tokens of {vocab}: one attention head, d {d}, Adam {args.lr:g}, "
          f"{args.steps} steps of {batch}, {args.seeds} seeds")
    print(f"  at init:  mean weight on the mirrored key {at_init['mirror_weight'].mean():.3f} "
          f"(uniform: {1 / t:.3f}); largest on it for {at_init['mirror_hit'].mean():.0%} of "
          f"queries")
    for name, k in (("token accuracy", "accuracy"),
                    ("largest weight on the mirrored key", "mirror_hit"),
                    ("mean weight on the mirrored key", "mirror_weight")):
        v = trained[k]
        print(f"  trained: {name} {v.min():.3f}–{v.max():.3f} over seeds "
              f"({', '.join(f'{u:.3f}' for u in v)})")
    maps = [at_init["maps"][0, 0], *trained["maps"][0], trained["mean_map"][0]]
    titles = ["at init, sequence 1", "trained, sequence 1", "trained, sequence 2",
              f"trained, mean over {len(x)}"]
    path = os.path.join(args.out, "attention_maps.png")
    plot(maps, titles, [x[0], x[0], x[1], None], path)
    print(f"wrote {path}")
    return {**trained, "init": at_init, "loss": np.asarray(vals), "params": params,
            "x": np.asarray(x), "vocab": vocab, "t": t, "d": d, "figure": path}


if __name__ == "__main__":
    main()
