"""Training step of a small CNN: fnn (autodiff, hand-derived backward) vs plain JAX vs PyTorch.

Network (issue 7): input ``(64, 28, 28, 1)``; conv 32 and conv 64 (3x3, SAME, ReLU); 2x2 max
pool; dense 128 (ReLU); dense 10; softmax cross-entropy; one SGD step. Every variant is one
jitted ``(params, x, y) -> (params, loss)``; timings are interleaved repetitions, medians.

  (a) fnn layers under ``jax.value_and_grad``            vs the same net in plain JAX
  (b) fnn hand backward, ``backprop.value_and_grad``     vs plain JAX autodiff
      fnn hand backward, ``backprop.custom_vjp`` under ``jax.grad``
      per-layer breakdown of the conv kernel gradient (XLA conv vs im2col matmul)
  (c) PyTorch eager (CPU), if ``torch`` imports.

    python benchmarks/bench_conv.py [--quick] [--reps N] [--batch B]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
from jax import lax

from fnn import backprop, losses
from fnn.combinators import serial
from fnn.layers import Conv, Dense, Flatten, MaxPool, Relu
from fnn.layers import conv as fconv

LR = 0.01
loss_fn = losses.softmax_cross_entropy_with_integer_labels


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Model name" in l)
    except Exception:
        return platform.processor() or "unknown"


# --------------------------------------------------------------------------- networks

def fnn_model():
    return serial(Conv(32, (3, 3)), Relu(), Conv(64, (3, 3)), Relu(), MaxPool((2, 2)), Flatten(),
                  Dense(128), Relu(), Dense(10))


def plain_forward(p, x):
    """The same network written directly in JAX (the reference for (a))."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn)
                    + p["b1"])
    h = jax.nn.relu(lax.conv_general_dilated(h, p["c2"], (1, 1), "SAME", dimension_numbers=dn)
                    + p["b2"])
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ p["w3"] + p["b3"])
    return h @ p["w4"] + p["b4"]


def plain_params(fp):
    """fnn's params renamed, so both nets start from the same numbers."""
    return {"c1": fp["0"]["w"], "b1": fp["0"]["b"], "c2": fp["2"]["w"], "b2": fp["2"]["b"],
            "w3": fp["6"]["w"], "b3": fp["6"]["b"], "w4": fp["8"]["w"], "b4": fp["8"]["b"]}


def sgd(p, g):
    return jax.tree.map(lambda a, b: a - LR * b, p, g)


def make_steps(model, state):
    custom = backprop.custom_vjp(model)
    manual = backprop.value_and_grad(model, loss_fn)

    def plain(p, x, y):
        l, g = jax.value_and_grad(lambda p: jnp.mean(
            -jax.nn.log_softmax(plain_forward(p, x))[jnp.arange(y.shape[0]), y]))(p)
        return sgd(p, g), l

    def fnn_autodiff(p, x, y):
        l, g = jax.value_and_grad(lambda p: loss_fn(model.apply(p, state, x)[0], y))(p)
        return sgd(p, g), l

    def fnn_manual(p, x, y):
        (l, _), g = manual(p, state, x, y)
        return sgd(p, g), l

    def fnn_custom_vjp(p, x, y):
        l, g = jax.value_and_grad(lambda p: loss_fn(custom.apply(p, state, x)[0], y))(p)
        return sgd(p, g), l

    return {"plain JAX autodiff": jax.jit(plain), "fnn autodiff": jax.jit(fnn_autodiff),
            "fnn hand (backprop.value_and_grad)": jax.jit(fnn_manual),
            "fnn hand (custom_vjp + jax.grad)": jax.jit(fnn_custom_vjp)}


def torch_step(batch):
    """PyTorch eager step, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(14 * 14 * 64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        l = torch.nn.functional.cross_entropy(net(x), y)
        l.backward()
        opt.step()
        return l
    return step


# --------------------------------------------------------------------------- timing

def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def run(cases, reps):
    """Interleaved repetitions (a round runs every case once, the order rotating: PyTorch's
    OpenMP threads spin for a while after its call and slow whatever runs next); median
    seconds per case."""
    for fn in cases.values():
        fn()                                                     # compile / warm up
    times = {n: [] for n in cases}
    names = list(cases)
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(timed(cases[n]))
    return {n: statistics.median(t) for n, t in times.items()}


def kernel_grad_breakdown(reps, batch):
    """The second conv's kernel gradient alone: XLA conv vs im2col matmul (the choice behind
    ``fnn.layers.conv.KERNEL_GRAD``), and its input gradient and forward for scale."""
    k = jax.random.PRNGKey(1)
    x = jax.random.normal(k, (batch, 28, 28, 32))
    w = 0.1 * jax.random.normal(k, (3, 3, 32, 64))
    dy = jax.random.normal(k, (batch, 28, 28, 64))
    fw = {m: jax.jit(lambda x, w, dy, m=m: fconv.conv_backward(x, w, dy, kernel_grad=m)[0])
          for m in ("conv", "im2col")}
    fwd = jax.jit(fconv.conv)
    cases = {"forward": lambda: fwd(x, w),
             "kernel grad, XLA conv": lambda: fw["conv"](x, w, dy),
             "kernel grad, im2col matmul": lambda: fw["im2col"](x, w, dy),
             "kernel grad, jax.vjp": lambda: vjp_w(x, w, dy)}
    vjp_w = jax.jit(lambda x, w, dy: jax.vjp(lambda w: fconv.conv(x, w), w)[1](dy)[0])
    ref = fw["conv"](x, w, dy)
    err = float(jnp.max(jnp.abs(ref - fw["im2col"](x, w, dy))) / jnp.max(jnp.abs(ref)))
    return run(cases, reps), err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions, for a smoke test")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 15)
    print(f"CPU: {cpu_model()}   cores: {os.cpu_count()}   backend: {jax.default_backend()}   "
          f"jax {jax.__version__}   load avg: {os.getloadavg()[0]:.1f}")
    print(f"kernel_grad='auto' resolves to "
          f"{fconv.KERNEL_GRAD.get(jax.default_backend(), 'conv')!r} here; reps={reps}")

    model = fnn_model()
    fp, fs, _ = model.init(jax.random.PRNGKey(0), (args.batch, 28, 28, 1))
    pp = plain_params(fp)
    x = jax.random.normal(jax.random.PRNGKey(2), (args.batch, 28, 28, 1))
    y = jax.random.randint(jax.random.PRNGKey(3), (args.batch,), 0, 10)
    steps = make_steps(model, fs)
    losses_ = {n: float(f(pp if n.startswith("plain") else fp, x, y)[1]) for n, f in steps.items()}
    assert max(losses_.values()) - min(losses_.values()) < 1e-4, losses_
    cases = {n: (lambda f=f, p=(pp if n.startswith("plain") else fp): f(p, x, y)[1])
             for n, f in steps.items()}
    tstep = torch_step(args.batch)
    if tstep is not None:
        cases["PyTorch eager"] = tstep
    med = run(cases, reps)

    base = med["plain JAX autodiff"]
    print(f"\nTraining step, batch {args.batch}, 28x28x1 -> conv32 -> conv64 -> pool -> 128 -> 10")
    print(f"{'variant':38s} {'median ms':>10s} {'vs plain JAX':>13s}"
          + (f" {'vs PyTorch':>11s}" if tstep else ""))
    for n, t in med.items():
        row = f"{n:38s} {t * 1e3:10.1f} {t / base:12.2f}x"
        if tstep:
            row += f" {t / med['PyTorch eager']:10.2f}x"
        print(row)
    if tstep is None:
        print("(PyTorch not installed: the PyTorch eager comparison is skipped)")
    print(f"(a) fnn autodiff / plain JAX: {med['fnn autodiff'] / base:.2f}x   (goal <= 1.05x)")
    print(f"(b) fnn hand backward / plain JAX: "
          f"{med['fnn hand (backprop.value_and_grad)'] / base:.2f}x (value_and_grad), "
          f"{med['fnn hand (custom_vjp + jax.grad)'] / base:.2f}x (custom_vjp)")

    kmed, err = kernel_grad_breakdown(reps, args.batch)
    print(f"\nSecond conv alone (batch {args.batch}, 28x28, 32 -> 64, 3x3 SAME); "
          f"relative max |XLA - im2col| = {err:.1e}")
    for n, t in kmed.items():
        print(f"{n:38s} {t * 1e3:10.1f} ms")


if __name__ == "__main__":
    main()
