"""Fused (flash) attention on a TPU v5e, compiled deviceless: what XLA's analyses report.

Needs libtpu (``pip install 'fnn[tpu]'``); no TPU. Run::

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python benchmarks/bench_flash_tpu.py [--small]

1. The attention op alone at the 111M GPT's shape (batch 8, 1024 tokens, 12 heads of 64,
   bfloat16, causal), forward + backward: fnn's jnp form vs the Pallas kernels, the kernels with
   and without their declared cost (``pl.CostEstimate``): what ``cost_analysis()`` sees.
2. The 111M GPT (``mixed_precision(GPT(32768, 768, 12, 12, 3072, 1024), "bfloat16")``, batch
   8 × 1024) training gradient (hand backward, ``fnn.backprop.value_and_grad``; ``--autodiff``:
   also ``jax.value_and_grad`` of ``apply``), with ``flash_attention_mode`` "never" vs "auto":
   temp memory from the scanned model (what runs); FLOPs and bytes accessed from builds with the
   blocks unrolled, depth 1 and 2, extrapolated to 12 (XLA counts a loop body once).

Compiles only (nothing runs); prints one line per build. ``--small``: a 2-block, 256-token GPT
(a quick check of the script).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from fnn import backprop  # noqa: E402
from fnn.kernels import _flash as fa  # noqa: E402
from fnn.kernels import flash_attention_mode  # noqa: E402
from fnn.layers.attention import dot_product_attention_bwd, dot_product_attention_fwd  # noqa
from fnn.models import GPT, lm_loss  # noqa: E402
from fnn.precision import mixed_precision  # noqa: E402

GIB = 1 << 30


def v5e():
    from jax.experimental import topologies
    topo = topologies.get_topology_desc("v5e:1x1", "tpu", chips_per_host_bounds=(1, 1, 1))
    return NamedSharding(topologies.make_mesh(topo, (1,), ("d",)), P())


def abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def report(label, fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    secs = time.perf_counter() - t0
    cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
    kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    out = {"flops": cost.get("flops", 0), "bytes": cost.get("bytes accessed", 0),
           "temp": mem.temp_size_in_bytes}
    print(f"{label:58s} flops {out['flops']:.3e}  bytes {out['bytes']:.3e}"
          f"  temp {out['temp'] / GIB:6.3f} GiB  kernels {kernels}  compile {secs:5.1f} s",
          flush=True)
    return out


def attention_op(sh, b=8, t=1024, h=12, d=64):
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=sh)

    def jnp_form(q, k, v, do):
        out, res = dot_product_attention_fwd(q, k, v, causal=True)
        return out, dot_product_attention_bwd(res, do, causal=True)

    def kernels(q, k, v, do):
        out, stats = fa.flash_attention_fwd(q, k, v, causal=True)
        return out, fa.flash_attention_bwd(q, k, v, out, stats, do, causal=True)

    report(f"attention {b}x{t}x{h}x{d} bf16 causal: jnp form", jnp_form, q, q, q, q)
    report("attention: Pallas kernels, declared cost", kernels, q, q, q, q)
    fa.DECLARE_COST = False
    jax.clear_caches()
    report("attention: Pallas kernels, no declared cost", kernels, q, q, q, q)
    fa.DECLARE_COST = True
    jax.clear_caches()


def gpt(sh, small, autodiff):
    """Temp memory from the scanned model at full depth; FLOPs and bytes from unrolled builds of
    depth 1 and 2, extrapolated to the full depth (XLA counts a loop body once)."""
    vocab, d, heads, mlp = 32768, 768, 12, 3072
    depth, b, t = (2, 2, 256) if small else (12, 8, 1024)
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh)

    def build(n, unrolled):
        model = GPT(vocab, d, heads, n, mlp, t)
        model = model.meta["unrolled"] if unrolled else model
        params, state, _ = jax.eval_shape(lambda k: model.init(k, (b, t)), jax.random.PRNGKey(0))
        return mixed_precision(model, "bfloat16"), abstract(params, sh), abstract(state, sh)

    def hand_step(n, unrolled, label):
        mp, params, state = build(n, unrolled)
        hand = backprop.value_and_grad(mp, lm_loss)
        return report(label, lambda p, s, x, y: hand(p, s, x, y, train=True), params, state,
                      tokens, tokens)

    name = f"GPT d{d} {b}x{t} bf16"
    for mode in ("never", "auto"):
        with flash_attention_mode(mode):
            hand_step(depth, False, f"{name} hand, depth {depth} scan, flash {mode}")
            one = hand_step(1, True, f"{name} hand, depth 1 unrolled, flash {mode}")
            two = hand_step(2, True, f"{name} hand, depth 2 unrolled, flash {mode}")
            full = {k: one[k] + (depth - 1) * (two[k] - one[k]) for k in ("flops", "bytes")}
            print(f"{name} hand, depth {depth} extrapolated, flash {mode}: flops "
                  f"{full['flops']:.3e}  bytes {full['bytes']:.3e}", flush=True)
            if autodiff:
                mp, params, state = build(depth, False)
                grad = jax.value_and_grad(lambda p, s, x, y: lm_loss(
                    mp.apply(p, s, x, train=True)[0], y))
                report(f"{name} autodiff, depth {depth} scan, flash {mode}", grad, params, state,
                       tokens, tokens)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--skip-op", action="store_true")
    ap.add_argument("--autodiff", action="store_true", help="also jax.value_and_grad's step")
    a = ap.parse_args()
    print(f"jax {jax.__version__}, TPU v5e (deviceless), {time.strftime('%Y-%m-%d %H:%M')}")
    sharding = v5e()
    if not a.skip_op:
        attention_op(sharding)
    gpt(sharding, a.small, a.autodiff)
