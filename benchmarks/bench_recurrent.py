"""Benchmark: one training step of an LSTM / GRU sequence regressor, fnn versus plain JAX.

Network (the issue's): batch 32, 64 steps, 64 inputs, hidden 256, a linear readout of the last
output, MSE loss; a training step is loss + gradients + an SGD update, jitted, float32.

Compared, per cell, in one run with interleaved repetitions (medians):

- ``jax``:      the same network in plain JAX (input projection hoisted out of the scan),
                gradients by ``jax.value_and_grad`` — the reference;
- ``fnn-ad``:   ``serial(LSTM(256, return_sequences=False), Dense(1))`` with ``jax.value_and_grad``
                of its ``apply`` (goal: at most 1.05x the reference);
- ``fnn-hand``: the same model with ``fnn.backprop.value_and_grad``: the layers' ``fwd`` (fast
                forward keeping the gate activations) and ``bwd`` (BPTT by hand from them),
                ``loop="auto"``: the loop form the tuner chose (``recurrent.loop``, printed;
                the scan with ``FNN_TUNE=off``) (goals: at most the autodiff step, at most
                PyTorch);
- ``fnn-scan``: the hand step with ``loop="scan"``, the untuned form (before the tuner);
- ``torch``:    PyTorch eager ``nn.LSTM``/``nn.GRU`` + ``nn.Linear``, when torch is importable.

    python benchmarks/bench_recurrent.py [--quick] [--reps N] [--cells lstm,gru] [--threads 1]

Both wall-clock and process CPU time are reported (medians). On a shared, loaded machine the
CPU time of a single-threaded run (``--threads 1``: XLA and PyTorch alike) is the steadiest
measure of the work done; PyTorch's two-thread runs suffer most from a loaded machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--threads" in sys.argv:                      # must be set before jax is imported
    _n = sys.argv[sys.argv.index("--threads") + 1]
    _eigen = "false" if _n == "1" else "true"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen="
                               f"{_eigen} intra_op_parallelism_threads={_n}")

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, losses, tuning
from fnn.combinators import serial
from fnn.layers import GRU, LSTM, Dense

B, T, F, H, OUT, LR = 32, 64, 64, 256, 1, 1e-2


# --------------------------------------------------------------------------- plain JAX

def jax_lstm_last(p, x):
    xp = jnp.einsum("btf,fg->tbg", x, p["wi"]) + p["b"]          # (T, B, 4H)

    def step(carry, xp_t):
        h, c = carry
        i, f, g, o = jnp.split(xp_t + h @ p["wh"], 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return (jax.nn.sigmoid(o) * jnp.tanh(c), c), None
    z = jnp.zeros((x.shape[0], p["wh"].shape[0]), x.dtype)
    (h, _), _ = jax.lax.scan(step, (z, z), xp)
    return h


def jax_gru_last(p, x):
    xp = jnp.einsum("btf,fg->tbg", x, p["wi"]) + p["bi"]         # (T, B, 3H)

    def step(h, xp_t):
        xr, xz, xn = jnp.split(xp_t, 3, axis=-1)
        hr, hz, hn = jnp.split(h @ p["wh"] + p["bh"], 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], p["wh"].shape[0]), x.dtype), xp)
    return h


def jax_step(rnn_last):
    def loss(p, x, t):
        y = rnn_last(p["0"], x) @ p["1"]["w"] + p["1"]["b"]
        return jnp.mean((y - t) ** 2)

    @jax.jit
    def step(p, x, t):
        value, g = jax.value_and_grad(loss)(p, x, t)
        return jax.tree.map(lambda a, b: a - LR * b, p, g), value
    return step


# --------------------------------------------------------------------------- fnn

def fnn_steps(model):
    def loss(p, s, x, t):
        return losses.mse(model.apply(p, s, x)[0], t)

    @jax.jit
    def autodiff(p, s, x, t):
        value, g = jax.value_and_grad(loss)(p, s, x, t)
        return jax.tree.map(lambda a, b: a - LR * b, p, g), value

    vg = backprop.value_and_grad(model, losses.mse)

    @jax.jit
    def hand(p, s, x, t):
        (value, _), g = vg(p, s, x, t)
        return jax.tree.map(lambda a, b: a - LR * b, p, g), value
    return autodiff, hand


# --------------------------------------------------------------------------- torch (optional)

def torch_step(cell, threads=None):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(int(threads) if threads else (os.cpu_count() or 1))
    rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(F, H, batch_first=True)
    lin = torch.nn.Linear(H, OUT)
    opt = torch.optim.SGD(list(rnn.parameters()) + list(lin.parameters()), lr=LR)

    def step(x, t):
        opt.zero_grad()
        out, _ = rnn(x)
        loss = torch.mean((lin(out[:, -1]) - t) ** 2)
        loss.backward()
        opt.step()
        return loss
    as_torch = lambda a: torch.from_numpy(np.asarray(a))
    return lambda p, x, t: (p, step(as_torch(x), as_torch(t)))


# --------------------------------------------------------------------------- timing

def block(out):
    jax.block_until_ready(out)


def time_all(fns, reps, inner):
    """Interleaved repetitions: each rep times ``inner`` calls of every function in turn, the
    order rotating from rep to rep (PyTorch's OpenMP threads keep spinning for a while after
    its call and slow whatever runs next: 1-3 ms of a 25 ms step in a fixed order).
    Returns ``{name: (median wall seconds, median CPU seconds)}`` per call."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for k, (f, a) in fns.items():                                  # compile + warm up
        block(f(*a))
        block(f(*a))
    names = list(fns)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f, a = fns[k]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                out = f(*a)
            block(out)
            wall[k].append((time.perf_counter() - t0) / inner)
            cpu[k].append((time.process_time() - c0) / inner)
    return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in fns}


def check_agree(fnn_ad, fnn_hand, p, s, x, t):
    """The hand step and the autodiff step must produce the same update."""
    pa, la = fnn_ad(p, s, x, t)
    ph, lh = fnn_hand(p, s, x, t)
    err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
              for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(ph)))
    return float(la), float(lh), err


def _loop_choice():
    """The tuner's latest ``recurrent.loop`` entry in this process: its timings and choice."""
    from fnn.tuning.measure import memo_entries
    entries = [e for e in memo_entries() if e["key"]["point"] == "recurrent.loop"]
    if not entries:
        return "scan (not measured)"
    times = entries[-1]["times_ms"]
    return ", ".join(f"{n} {t:.1f} ms" for n, t in sorted(times.items(), key=lambda kv: kv[1]))


def run(cell, reps, inner, threads=None):
    key = jax.random.PRNGKey(0)
    kx, kt, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (B, T, F), jnp.float32)
    t = jax.random.normal(kt, (B, OUT), jnp.float32)
    rnn = LSTM if cell == "lstm" else GRU
    model = serial(rnn(H, return_sequences=False), Dense(OUT))
    p, s, _ = model.init(kp, (B, T, F))
    ad, hand = fnn_steps(model)
    _, scan = fnn_steps(serial(rnn(H, return_sequences=False, loop="scan"), Dense(OUT)))
    ref = jax_step(jax_lstm_last if cell == "lstm" else jax_gru_last)
    t0 = time.perf_counter()
    jax.block_until_ready(hand(p, s, x, t))                    # the tuner measures here, once
    print(f"\n{cell.upper()}: recurrent.loop {_loop_choice()} (tuner "
          f"{'on' if tuning.enabled() else 'off'}; first hand step "
          f"{time.perf_counter() - t0:.1f} s, measuring and compiling)")
    la, lh, err = check_agree(ad, hand, p, s, x, t)
    lr = float(ref(p, x, t)[1])
    fns = {"jax": (ref, (p, x, t)), "fnn-ad": (ad, (p, s, x, t)), "fnn-hand": (hand, (p, s, x, t)),
           "fnn-scan": (scan, (p, s, x, t))}
    tstep = torch_step(cell, threads)
    if tstep is not None:
        fns["torch"] = (tstep, (None, x, t))
    med = time_all(fns, reps, inner)
    print(f"\n{cell.upper()}  (loss jax {lr:.5f} fnn-ad {la:.5f} fnn-hand {lh:.5f}; "
          f"hand vs autodiff update rel. diff {err:.1e})")
    print(f"  {'':9s} {'wall ms':>9s} {'ratio':>6s}   {'cpu ms':>9s} {'ratio':>6s}")
    w0, c0 = med["jax"]
    for k, (w, c) in med.items():
        print(f"  {k:9s} {1e3 * w:9.2f} {w / w0:5.2f}x   {1e3 * c:9.2f} {c / c0:5.2f}x")
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--threads", default=None,
                    help="XLA and PyTorch CPU threads (1: single-threaded)")
    a = ap.parse_args()
    reps, inner = (3, 1) if a.quick else (a.reps, a.inner)
    print(f"bench_recurrent: batch {B}, steps {T}, inputs {F}, hidden {H}, float32; "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cpus, XLA threads "
          f"{a.threads or 'default'}, {reps} reps x {inner}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch not importable: PyTorch column skipped")
    for cell in a.cells.split(","):
        run(cell, reps, inner, a.threads)


if __name__ == "__main__":
    main()
