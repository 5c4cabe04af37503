"""Attention and transformer benchmarks (issues 10, 14), float32 on CPU, one run, interleaved
medians.

(a) Training step (grads + SGD update) of a small causal LM — vocab 96, d 128, 4 heads, MLP 512,
    seq 128, batch 16, depth 4, learned positions, tied embedding: fnn with autodiff
    (``jax.value_and_grad`` of ``GPT.apply``), fnn with its hand-derived rules (blocks in a
    ``stack``: ``fnn.models.value_and_grad`` = ``backprop.value_and_grad``, and
    ``backprop.custom_vjp(gpt)`` under ``jax.grad``, also with ``remat=True``; blocks unrolled:
    ``unroll=True``), the same model in plain JAX (unrolled, fused QKV, autodiff), and PyTorch
    eager if installed. Ratios to plain JAX.
(b) ``stack`` against unrolled blocks at depth 6, 12, 24 (``--quick``: 6, 12): compile time and
    step time of the autodiff and hand training steps (``stack`` also with ``remat=True``);
    plain JAX unrolled and ``lax.scan`` too; compiled peak memory (temp + arguments + outputs)
    of each step.
(c) Causal attention forward + hand backward (``dot_product_attention_vjp``: one pass), batch 1,
    4 heads, head_dim 64, plain against chunked (``chunk_size=512``; also as a layer:
    ``backprop.value_and_grad`` over ``MultiHeadAttention(4, chunk_size=512)`` on 256 features,
    which adds the four projections, and the same layer run as ``apply`` then ``backward``, two
    forwards) and ``jax.nn.dot_product_attention`` + autodiff: XLA's compiled
    peak memory (temp + arguments + outputs, from ``memory_analysis``; compile only) at 1k-32k,
    and time where it runs (``--quick``: to 4k plain / 8k chunked; ``--full``: 8k / 32k).
(d) Decoding 256 tokens after a 16-token prompt (model of (a), batch 1, greedy): KV cache
    (``fnn.models.sample``) against recomputing the whole prefix every step.

    python benchmarks/bench_attention.py [--quick | --full] [--parts abcd] [--rounds N]
        [--depths 6,12] [--kinds stack,unrolled] [--lengths 2048]
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from fnn import backprop, losses
from fnn.combinators import serial, stack
from fnn.layers import (Dense, Embedding, LayerNorm, MultiHeadAttention, PositionalEmbedding,
                        TransformerBlock)
from fnn.layers.attention import dot_product_attention_vjp
from fnn.models import GPT, lm_loss, sample, value_and_grad

V, D, H, MLP, T, B, DEPTH = 96, 128, 4, 512, 128, 16, 4
LR = 1e-3


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Model name" in l)
    except Exception:                                            # noqa: BLE001
        return platform.processor() or "unknown"


def block(x):
    return jax.block_until_ready(x)


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each (already compiled) function, interleaving the calls."""
    times = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            block(fns[n]())
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def compiled(f, *args):
    """``(compiled f, compile seconds)``."""
    t0 = time.perf_counter()
    c = jax.jit(f).lower(*args).compile()
    return c, time.perf_counter() - t0


def sgd(p, g):
    return jax.tree.map(lambda a, b: a - LR * b, p, g)


# --------------------------------------------------------------------------- plain JAX model

def plain_init(key, depth):
    ks = iter(jax.random.split(key, 4 + 4 * depth))
    n = lambda shape, s=0.02: s * jax.random.normal(next(ks), shape)
    ln = lambda: {"s": jnp.ones(D), "b": jnp.zeros(D)}
    blocks = [{"ln1": ln(), "wqkv": n((D, 3 * D)), "bqkv": jnp.zeros(3 * D), "wo": n((D, D)),
               "bo": jnp.zeros(D), "ln2": ln(), "w1": n((D, MLP)), "b1": jnp.zeros(MLP),
               "w2": n((MLP, D)), "b2": jnp.zeros(D)} for _ in range(depth)]
    return {"E": n((V, D)), "P": n((T, D)), "blocks": blocks, "lnf": ln()}


def _ln(x, p):
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * p["s"] + p["b"]


def _gelu(z):     # exact GELU written out: jax.nn.gelu(approximate=False) measured ~3x slower
    return 0.5 * z * (1 + jax.lax.erf(z / math.sqrt(2)))


def plain_block(x, p):
    b, t, _ = x.shape
    qkv = _ln(x, p["ln1"]) @ p["wqkv"] + p["bqkv"]
    q, k, v = (a.reshape(b, t, H, D // H) for a in jnp.split(qkv, 3, axis=-1))
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D // H)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, D)
    x = x + a @ p["wo"] + p["bo"]
    h = _gelu(_ln(x, p["ln2"]) @ p["w1"] + p["b1"])
    return x + h @ p["w2"] + p["b2"]


def plain_loss(params, tokens, targets, scan=False):
    x = params["E"][tokens] + params["P"][None, :tokens.shape[1]]
    if scan:
        x, _ = jax.lax.scan(lambda h, p: (plain_block(h, p), None), x,
                            jax.tree.map(lambda *a: jnp.stack(a), *params["blocks"]))
    else:
        for p in params["blocks"]:
            x = plain_block(x, p)
    logits = _ln(x, params["lnf"]) @ params["E"].T
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))


def plain_step(scan=False):
    def step(params, tokens, targets):
        loss, g = jax.value_and_grad(plain_loss)(params, tokens, targets, scan)
        return sgd(params, g), loss
    return step


# --------------------------------------------------------------------------- fnn steps

def fnn_steps(model, state):
    def auto(params, tokens, targets):
        f = lambda p: lm_loss(model.apply(p, state, tokens)[0], targets)
        loss, g = jax.value_and_grad(f)(params)
        return sgd(params, g), loss

    def hand(params, tokens, targets, unroll=False):
        (loss, _), g = value_and_grad(model, unroll=unroll)(params, state, tokens, targets,
                                                            train=False)
        return sgd(params, g), loss

    bridged = backprop.custom_vjp(model)

    def custom(params, tokens, targets):
        f = lambda p: lm_loss(bridged.apply(p, state, tokens)[0], targets)
        loss, g = jax.value_and_grad(f)(params)
        return sgd(params, g), loss
    return {"fnn-autodiff": auto, "fnn-hand stack (value_and_grad)": hand,
            "fnn-hand stack (custom_vjp + jax.grad)": custom,
            "fnn-hand unrolled": lambda p, x, y: hand(p, x, y, unroll=True)}


def data(key):
    toks = jax.random.randint(key, (B, T + 1), 0, V)
    return toks[:, :-1], toks[:, 1:]


def part_a(rounds):
    print(f"\n(a) training step: vocab {V}, d {D}, {H} heads, MLP {MLP}, seq {T}, batch {B}, "
          f"depth {DEPTH} (float32)")
    model = GPT(V, D, H, DEPTH, MLP, T)
    params, state, _ = model.init(jax.random.PRNGKey(0), (B, T))
    x, y = data(jax.random.PRNGKey(1))
    runs = {}
    steps = fnn_steps(model, state)
    deep = GPT(V, D, H, DEPTH, MLP, T, remat=True)
    steps["fnn-hand stack remat (custom_vjp + jax.grad)"] = \
        fnn_steps(deep, state)["fnn-hand stack (custom_vjp + jax.grad)"]
    for name, step in steps.items():
        c, _ = compiled(step, params, x, y)
        runs[name] = (lambda c=c: c(params, x, y))
    pparams = plain_init(jax.random.PRNGKey(0), DEPTH)
    c, _ = compiled(plain_step(), pparams, x, y)
    runs["plain JAX"] = lambda: c(pparams, x, y)
    tstep = torch_step()
    if tstep is None:
        print("  PyTorch eager: not installed (optional `bench` extra)")
    else:
        runs["PyTorch eager"] = tstep
    med = interleaved(runs, rounds)
    base = med["plain JAX"]
    for n, t in med.items():
        print(f"  {n:46s} {1e3 * t:8.1f} ms   {t / base:5.2f}x plain JAX")
    if tstep is not None:
        best = min((t, n) for n, t in med.items() if n.startswith("fnn"))
        print(f"  fastest fnn variant / PyTorch: {best[0] / med['PyTorch eager']:.2f}x ({best[1]})")


def torch_step():
    """The model of (a) as a PyTorch eager SGD step (a callable), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    layer = torch.nn.TransformerEncoderLayer(D, H, MLP, 0.0, activation="gelu",
                                             batch_first=True, norm_first=True)
    net = torch.nn.ModuleDict({"emb": torch.nn.Embedding(V, D),
                               "blocks": torch.nn.TransformerEncoder(layer, DEPTH),
                               "ln": torch.nn.LayerNorm(D)})
    pos = torch.nn.Parameter(torch.zeros(T, D))
    opt = torch.optim.SGD(list(net.parameters()) + [pos], lr=LR)
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T)

    def step():
        h = net["blocks"](net["emb"](x) + pos, mask=mask, is_causal=True)
        loss = torch.nn.functional.cross_entropy(
            (net["ln"](h) @ net["emb"].weight.T).reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    return step


# --------------------------------------------------------------------------- (b) stack

def lm(blocks):
    return serial(("embed", Embedding(V, D)), ("pos", PositionalEmbedding(T)),
                  ("blocks", blocks), ("norm", LayerNorm()), ("head", Dense(V)))


def peak_mib(c):
    m = c.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20


def part_b(rounds, depths, kinds=("stack", "stack remat", "unrolled", "plain")):
    print("\n(b) stack vs unrolled: compile s / step ms / compiled peak MiB (float32, model of (a) "
          "with an untied head)")
    x, y = data(jax.random.PRNGKey(1))
    blk = TransformerBlock(H, MLP, causal=True)
    for depth in depths:
        runs, comp, mem = {}, {}, {}
        for kind, blocks in (("stack", stack(blk, depth)), ("stack remat", stack(blk, depth,
                                                                                  remat=True)),
                             ("unrolled", serial(*[blk] * depth))):
            if kind not in kinds:
                continue
            model = lm(blocks)
            params, state, _ = model.init(jax.random.PRNGKey(0), (B, T))
            auto = lambda p, x, y, m=model, s=state: sgd(p, jax.grad(
                lambda p: lm_loss(m.apply(p, s, x)[0], y))(p))
            vg = backprop.value_and_grad(model, lm_loss)
            hand = lambda p, x, y, vg=vg, s=state: sgd(p, vg(p, s, x, y, train=False)[1])
            for mode, step in (("autodiff", auto), ("hand", hand)):
                n = f"fnn {kind} {mode}"
                c, comp[n] = compiled(step, params, x, y)
                mem[n] = peak_mib(c)
                runs[n] = (lambda c=c, p=params: c(p, x, y))
        pparams = plain_init(jax.random.PRNGKey(0), depth)
        for kind, scan in (("unrolled", False), ("scan", True)) if "plain" in kinds else ():
            c, comp[f"plain JAX {kind}"] = compiled(plain_step(scan), pparams, x, y)
            mem[f"plain JAX {kind}"] = peak_mib(c)
            runs[f"plain JAX {kind}"] = (lambda c=c: c(pparams, x, y))
        med = interleaved(runs, rounds)
        print(f"  depth {depth}:")
        for n in runs:
            print(f"    {n:28s} compile {comp[n]:6.1f} s   step {1e3 * med[n]:8.1f} ms   "
                  f"peak {mem[n]:7.0f} MiB")
        if "fnn unrolled hand" in med and "fnn stack hand" in med:
            print(f"    stack hand / unrolled hand: "
                  f"{med['fnn stack hand'] / med['fnn unrolled hand']:.2f}x")
        if "fnn stack hand" in med:
            print(f"    stack hand / stack autodiff: "
                  f"{med['fnn stack hand'] / med['fnn stack autodiff']:.2f}x")


# --------------------------------------------------------------------------- (c) memory

def attention_fns(t):
    def fnn_plain(q, k, v, do):
        return dot_product_attention_vjp(q, k, v, do, causal=True)

    def fnn_chunked(q, k, v, do):
        return dot_product_attention_vjp(q, k, v, do, causal=True, chunk_size=min(512, t))

    layer = MultiHeadAttention(4, causal=True, chunk_size=min(512, t))
    params, state, _ = layer.init(jax.random.PRNGKey(0), (1, t, 256))
    vg = backprop.value_and_grad(layer, losses.mse)

    def chunked_layer(q, k, v, do):               # fwd once, bwd from its residuals
        x, target = q.reshape(1, t, 256), do.reshape(1, t, 256)
        return vg(params, state, x, target, train=False)

    w = {n: params[n]["w"] for n in "qkvo"}

    def one_pass_layer(q, k, v, do):              # the layer's maths around the one-pass VJP
        x, dy = q.reshape(1, t, 256), do.reshape(1, t, 256)
        heads = lambda a: a.reshape(1, t, 4, 64)
        qh, kh, vh = (heads(x @ w[n]) for n in "qkv")
        da = heads(dy @ w["o"].T)
        out, (dq, dk, dv) = dot_product_attention_vjp(qh, kh, vh, da, causal=True,
                                                      chunk_size=min(512, t))
        a = out.reshape(1, t, 256)
        flat = lambda g: g.reshape(t, 256)
        xf = x.reshape(t, 256)
        return (a @ w["o"], {n: xf.T @ flat(g) for n, g in zip("qkv", (dq, dk, dv))},
                flat(a).T @ flat(dy), sum(flat(g) @ w[n].T for n, g in zip("qkv", (dq, dk, dv))))

    def chunked_layer_twice(q, k, v, do):         # apply, then backward (which runs fwd again)
        x, dy = q.reshape(1, t, 256), do.reshape(1, t, 256)
        return layer.apply(params, state, x)[0], layer.backward(params, state, x, dy)

    def jax_nn(q, k, v, do):
        out, pull = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                            q, k, v)
        return out, pull(do)
    return {"fnn plain": fnn_plain, "fnn chunked": fnn_chunked,
            "MHA chunked, value_and_grad": chunked_layer, "MHA maths + one-pass VJP": one_pass_layer,
            "MHA chunked, apply + backward": chunked_layer_twice, "jax.nn + autodiff": jax_nn}


def part_c(rounds, lengths, time_limits):
    print("\n(c) causal attention fwd+bwd, batch 1, 4 heads, head_dim 64 (float32): "
          "compiled peak MiB / time")
    for t in lengths:
        x = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
        row, runs = [], {}
        for name, f in attention_fns(t).items():
            c, _ = compiled(f, x, x, x, x)
            m = c.memory_analysis()
            mib = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20
            row.append(f"{name:30s} {mib:7.0f} MiB")
            if t <= time_limits[name]:
                q = jax.random.normal(jax.random.PRNGKey(t), (1, t, 4, 64))
                runs[name] = (lambda c=c, q=q: c(q, q, q, q))
        med = interleaved(runs, rounds) if runs else {}
        print(f"  T={t}:")
        for r, name in zip(row, attention_fns(t)):
            print(f"    {r}" + (f"   {1e3 * med[name]:9.1f} ms" if name in med else ""))
        a, b = "MHA chunked, value_and_grad", "MHA maths + one-pass VJP"
        if a in med and b in med:
            print(f"    layer / one-pass: {med[a] / med[b]:.2f}x")


# --------------------------------------------------------------------------- (d) decoding

def part_d(rounds, new=256, prompt_len=16):
    print(f"\n(d) decoding {new} tokens after a {prompt_len}-token prompt, batch 1 (float32)")
    total = prompt_len + new
    model = GPT(V, D, H, DEPTH, MLP, total)
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, total))
    prompt = jax.random.randint(jax.random.PRNGKey(2), (1, prompt_len), 0, V)

    @jax.jit
    def recompute(params, prompt):
        buf = jnp.zeros((1, total), jnp.int32).at[:, :prompt_len].set(prompt)

        def step(buf, t):           # the whole (causal) forward, read the row before t
            logits = model.apply(params, state, buf)[0][0, t - 1]
            return buf.at[0, t].set(jnp.argmax(logits).astype(jnp.int32)), None
        return jax.lax.scan(step, buf, jnp.arange(prompt_len, total))[0]
    cached = lambda: sample(model, params, state, jax.random.PRNGKey(0), prompt, new,
                            temperature=0.0)
    a, b = block(cached()), block(recompute(params, prompt))
    same = bool(jnp.all(a == b))
    med = interleaved({"KV cache": cached, "recompute": lambda: recompute(params, prompt)},
                      rounds)
    for n, s in med.items():
        print(f"  {n:10s} {1e3 * s:8.1f} ms   {1e3 * s / new:6.2f} ms/token")
    print(f"  speed-up {med['recompute'] / med['KV cache']:.1f}x; same tokens: {same}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer depths and lengths")
    ap.add_argument("--full", action="store_true", help="(c) up to 32k tokens, timed")
    ap.add_argument("--parts", default="abcd")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--depths", default=None, help="(b) depths, e.g. 12 or 6,24")
    ap.add_argument("--kinds", default="stack,stack remat,unrolled,plain",
                    help="(b) which columns: stack, stack remat, unrolled, plain")
    ap.add_argument("--lengths", default=None, help="(c) lengths, e.g. 2048")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 11)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, CPU: {cpu_model()}")
    if "a" in args.parts:
        part_a(rounds)
    if "b" in args.parts:
        depths = (6, 12) if args.quick else (6, 12, 24)
        part_b(max(3, rounds // 2), tuple(map(int, args.depths.split(","))) if args.depths
               else depths, tuple(args.kinds.split(",")))
    if "c" in args.parts:
        lengths = ([int(n) for n in args.lengths.split(",")] if args.lengths else
                   [1024, 2048, 4096, 8192, 16384, 32768])
        limits = ({"fnn plain": 8192, "fnn chunked": 32768, "MHA chunked, value_and_grad": 8192,
                   "MHA maths + one-pass VJP": 8192,
                   "MHA chunked, apply + backward": 8192, "jax.nn + autodiff": 8192}
                  if args.full else
                  {"fnn plain": 4096, "fnn chunked": 8192, "MHA chunked, value_and_grad": 4096,
                   "MHA maths + one-pass VJP": 4096,
                   "MHA chunked, apply + backward": 4096, "jax.nn + autodiff": 4096})
        part_c(5 if not args.full else 2, lengths, limits)
    if "d" in args.parts:
        part_d(max(3, rounds // 2))


if __name__ == "__main__":
    main()
