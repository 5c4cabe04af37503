"""GPT-2 and Llama (``fnn.models``) against Hugging Face ``transformers`` on the CPU (issue #24).

(a) Training step, batch 8 × 128 tokens, float32, plain SGD: fnn's hand backward
    (``fnn.models.value_and_grad``; jitted, params donated) and autodiff
    (``jax.value_and_grad`` of the same loss) against the ``transformers`` model's PyTorch eager
    step (``GPT2LMHeadModel`` / ``LlamaForCausalLM``, default attention, ``torch.optim.SGD``),
    the same weights (the PyTorch model's ``state_dict`` loaded into fnn), next-token
    cross-entropy on the logits. Each round times every contender once, in rotating order;
    medians. Goal: hand ≤ 1.00× PyTorch, hand ≤ autodiff.
(b) Greedy generation, batch 1, 8-token prompt, 128 new tokens: ``fnn.models.generate`` (KV
    cache, whole loop compiled) against ``model.generate(do_sample=False)`` (its KV cache), in
    tokens/s; interleaved, medians. Goal: fnn ≥ transformers.

Models (~10M parameters): GPT-2 ``n_embd=256, n_layer=8, n_head=8, vocab 16384``; Llama
``hidden 256, 8 layers, 8 heads / 4 kv heads, intermediate 688, vocab 8192``, untied.
Needs torch and transformers (``/work/venv_ref``). Run under ``flock /tmp/fnn_bench.lock``.

    python benchmarks/bench_models.py [--models gpt2 llama] [--parts a b] [--rounds 7]
                                      [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import sys

if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1] == "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from fnn.models import generate, gpt2, llama, lm_loss, value_and_grad
from fnn.torch_weights import load_state_dict

CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", gpt2,
             dict(vocab_size=16384, n_positions=256, n_embd=256, n_layer=8, n_head=8,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", llama,
              dict(vocab_size=8192, hidden_size=256, intermediate_size=688,
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                   max_position_embeddings=256)),
}
LR = 1e-3


def build(name):
    cfg_cls, arch, module, fields = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**fields)
    hf = getattr(transformers, arch)(config).float()
    model = module.from_hf_config(config.to_dict())
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params, state = load_state_dict(model, sd, module.hf_input_shape(config.to_dict()),
                                    dtype=jnp.float32)
    n = sum(p.numel() for p in hf.parameters())
    return hf, model, params, state, n


def fnn_steps(model, state):
    hand = value_and_grad(model)

    def sgd(params, grads):
        return jax.tree.map(lambda p, g: p - LR * g, params, grads)

    @jax.jit
    def step_hand(params, x, y):
        (loss, _), grads = hand(params, state, x, y)
        return sgd(params, grads), loss

    @jax.jit
    def step_auto(params, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: lm_loss(model.apply(p, state, x)[0], y))(params)
        return sgd(params, grads), loss
    return step_hand, step_auto


def torch_step(hf):
    opt = torch.optim.SGD(hf.parameters(), lr=LR)
    hf.train()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        logits = hf(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        loss.backward()
        opt.step()
        return loss
    return step


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def interleave(contenders: dict, rounds: int) -> dict:
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(contenders[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def part_a(name, rounds):
    hf, model, params, state, n = build(name)
    rng = np.random.default_rng(0)
    vocab = CONFIGS[name][3]["vocab_size"]
    x_np, y_np = rng.integers(0, vocab, (8, 128)), rng.integers(0, vocab, (8, 128))
    x, y = jnp.asarray(x_np, jnp.int32), jnp.asarray(y_np, jnp.int32)
    xt, yt = torch.from_numpy(x_np), torch.from_numpy(y_np)
    step_hand, step_auto = fnn_steps(model, state)
    tstep = torch_step(hf)
    # the three compute the same first loss from the same weights
    losses = [float(step_hand(params, x, y)[1]), float(step_auto(params, x, y)[1]),
              tstep(xt, yt).item()]
    p_hand, p_auto = params, jax.tree.map(jnp.copy, params)
    box = {"hand": p_hand, "auto": p_auto}

    def run(which, step):
        def go():
            box[which], loss = step(box[which], x, y)
            loss.block_until_ready()
        return go
    t0 = time.perf_counter()
    run("hand", step_hand)()
    run("auto", step_auto)()
    warm = time.perf_counter() - t0
    med = interleave({"fnn hand": run("hand", step_hand), "fnn autodiff": run("auto", step_auto),
                      "PyTorch eager": lambda: tstep(xt, yt)}, rounds)
    return n, losses, med, warm


def part_b(name, rounds, new=128):
    hf, model, params, _, _ = build(name)
    hf.eval()
    prompt = np.random.default_rng(1).integers(0, CONFIGS[name][3]["vocab_size"], (1, 8))
    pt = torch.from_numpy(prompt)
    mask = torch.ones_like(pt)

    def ours():
        generate(model, params, prompt, new).block_until_ready()

    def theirs():
        with torch.no_grad():
            hf.generate(pt, attention_mask=mask, do_sample=False, max_new_tokens=new,
                        min_new_tokens=new, pad_token_id=0)
    t = timed(ours)                                        # compile
    a = np.asarray(generate(model, params, prompt, new))
    with torch.no_grad():
        b = hf.generate(pt, attention_mask=mask, do_sample=False, max_new_tokens=new,
                        min_new_tokens=new, pad_token_id=0).numpy()
    agree = int((a == b).all(axis=0).argmin()) if not (a == b).all() else a.shape[1]
    med = interleave({"fnn generate": ours, "transformers generate": theirs}, rounds)
    return {k: new / v for k, v in med.items()}, t, agree


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=list(CONFIGS))
    ap.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="1: PyTorch and XLA on one thread each (steadier on a loaded machine)")
    args = ap.parse_args()
    if args.threads == 1:
        torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax "
          f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, load {os.getloadavg()[0]:.1f}")
    for name in args.models:
        if "a" in args.parts:
            n, losses, med, warm = part_a(name, args.rounds)
            print(f"## {name} ({n / 1e6:.1f}M params) training step 8x128, float32, SGD; "
                  f"first losses hand/auto/torch {losses[0]:.5f} {losses[1]:.5f} {losses[2]:.5f}")
            ref = med["PyTorch eager"]
            for k, v in med.items():
                print(f"  {k:16s} {v * 1e3:8.1f} ms   {v / ref:5.2f}x PyTorch")
            print(f"  hand / autodiff  {med['fnn hand'] / med['fnn autodiff']:.2f}   (first "
                  f"steps after compiling: {warm:.1f} s)")
        if "b" in args.parts:
            tps, compile_s, agree = part_b(name, args.rounds)
            print(f"## {name} greedy generation, batch 1, 8 + 128 tokens (fnn compile "
                  f"{compile_s:.1f} s; same tokens for the first {agree} positions)")
            for k, v in tps.items():
                print(f"  {k:22s} {v:8.1f} tokens/s")
            print(f"  fnn / transformers {tps['fnn generate'] / tps['transformers generate']:.2f}x")
        print(f"# load after {name}: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
