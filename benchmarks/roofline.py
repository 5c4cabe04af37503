"""Roofline table: training steps compiled for a TPU chip without one (deviceless, libtpu).

(a) The 111M-parameter GPT, ``mixed_precision(GPT(32768, 768, 12, 12, 3072, 1024),
    "bfloat16")``, one step (loss and gradients) at batch 8 × 1024 tokens: ``hand`` (the hand
    backward, ``fnn.backprop.value_and_grad``), ``autodiff`` (``jax.value_and_grad`` of the loss
    of ``apply``), ``chunked`` (``chunk_size=256`` attention, hand backward). FLOPs and bytes from
    depth-1 and depth-2 builds with every loop written out (``fnn.accelerators.unroll``),
    extrapolated to 12 blocks; temporary memory from the 12-block program as it is (one
    ``lax.scan`` over the blocks). Model FLOPs ``6·N·tokens`` (N = all parameters).
(b) The bundled tasks' training steps (float32, one training batch as ``fnn train`` uses),
    hand and autodiff (``fnn.accelerators.task_steps.roofline``); model FLOPs = the step's own.

Prints a Markdown table (``fnn.accelerators.roofline.table``) and, per row, the compile time.
Needs libtpu for a TPU chip (``pip install 'fnn[tpu]'``); run as

    JAX_PLATFORMS=cpu python benchmarks/roofline.py [--chip v5e] [--parts ab] [--target cpu]

``--target cpu`` counts with the host compiler against the chip's peaks (no libtpu needed).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax                                                  # noqa: E402
import jax.numpy as jnp                                     # noqa: E402

from fnn.accelerators import roofline as rl, task_steps     # noqa: E402
from fnn.models import GPT, lm_loss                         # noqa: E402
from fnn.precision import mixed_precision                   # noqa: E402

VOCAB, D, HEADS, DEPTH, MLP, SEQ, BATCH = 32768, 768, 12, 12, 3072, 1024, 8


def gpt_build(kind):
    """``build(depth) -> (step, args)`` of the 111M GPT's step ``kind``."""
    def build(depth):
        chunk = 256 if kind == "chunked" else None
        model = mixed_precision(GPT(VOCAB, D, HEADS, depth, MLP, SEQ, chunk_size=chunk),
                                "bfloat16")
        params, state, _ = jax.eval_shape(lambda k: model.init(k, (BATCH, SEQ)),
                                          jax.random.PRNGKey(0))
        tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
        step = task_steps.train_step(model, lm_loss, "autodiff" if kind == "autodiff" else "hand")
        return step, (params, state, tokens, tokens, jax.random.PRNGKey(0))
    return build


def part_a(chip, target):
    rows = {}
    params = jax.eval_shape(lambda k: GPT(VOCAB, D, HEADS, DEPTH, MLP, SEQ).init(k, (1, SEQ))[0],
                            jax.random.PRNGKey(0))
    model_flops = rl.six_n_d(params, BATCH * SEQ)
    n = sum(a.size for a in jax.tree.leaves(params))
    print(f"GPT: {n / 1e6:.1f}M parameters, 6·N·tokens = {model_flops:.3g} FLOPs per step")
    for kind in ("hand", "autodiff", "chunked"):
        t0 = time.perf_counter()
        rows[f"GPT-111M {kind}"] = r = rl.step_roofline(gpt_build(kind), chip, depth=DEPTH,
                                                        model_flops=model_flops, target=target)
        print(f"  {kind}: {r}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def part_b(chip, target):
    rows = {}
    for name in task_steps.NAMES:
        for kind in ("hand", "autodiff"):
            t0 = time.perf_counter()
            rows[f"{name} {kind}"] = r = task_steps.roofline(name, chip, kind, target=target)
            print(f"  {name} {kind}: {r}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chip", default="v5e")
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--target", default=None, help="compile for this instead of the chip")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, chip {args.chip}, compiled for {args.target or args.chip}")
    with jax.enable_x64(False):
        rows = {}
        if "a" in args.parts:
            rows.update(part_a(args.chip, args.target))
        if "b" in args.parts:
            rows.update(part_b(args.chip, args.target))
    print()
    print(rl.table(rows))


if __name__ == "__main__":
    main()
