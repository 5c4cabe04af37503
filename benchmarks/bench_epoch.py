"""The cost of ``fit``'s compiled epoch over a bare ``lax.scan`` epoch, and of a re-built optimizer.

(a) small MLP 64-64-64-10, batch 32, 100 steps per epoch, SGD, no shuffle, no validation:
    20 epochs of ``fnn.train.fit`` (one call) against 20 calls of a bare plain-JAX
    ``lax.scan`` epoch of the same step (value_and_grad, ``optimizer.update``,
    ``apply_updates``: no guard, no metrics). ``fit`` keeps its non-finite guard and its
    history (loss, accuracy, lr). Also ``fit(step=Step(grad_norm=True))``. Goal: ``fit`` ≤ 1.10×.
    Beside them, the bare epoch that also sums the loss and the correct predictions (the work
    behind ``fit``'s history, which the plain bare step skips: XLA drops its unused loss).
(b) ``fit`` called again with ``optim.sgd(0.01)`` built afresh (a loop, a re-run notebook
    cell): time of 20 epochs against the same call with the same optimizer object; goal: no
    recompilation (ratio ≈ 1).

Rounds interleaved (rotating order), medians; float32 on CPU.

    PYTHONPATH=. python benchmarks/bench_epoch.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnn import losses, optim, train
from fnn.layers import Dense, Relu, serial

CE = losses.softmax_cross_entropy_with_integer_labels
SIZES, BATCH, STEPS, EPOCHS = (64, 64, 64, 10), 32, 100, 20


def setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((STEPS * BATCH, SIZES[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, STEPS * BATCH), jnp.int32)
    model = serial(Dense(64), Relu(), Dense(64), Relu(), Dense(10))
    return model, x, y


def bare_epoch(model, state, opt, sums=False):
    """The floor: the same model, loss and optimizer in a plain ``lax.scan``. ``sums``: the
    step also sums what ``fit``'s history reports (the loss and the correct predictions), so
    the loss and the argmax are computed too (without it XLA drops the loss value)."""
    def step(carry, batch):
        params, opt_state, acc = carry
        xb, yb = batch

        def objective(p):
            logits = model.apply(p, state, xb)[0]
            return CE(logits, yb), logits
        if sums:
            (value, logits), g = jax.value_and_grad(objective, has_aux=True)(params)
            acc = acc + jnp.stack([value * yb.shape[0],
                                   jnp.sum(jnp.argmax(logits, -1) == yb).astype(acc.dtype)])
        else:
            g = jax.grad(lambda p: objective(p)[0])(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, acc), None

    @jax.jit
    def epoch(params, opt_state, xs, ys):
        p, s, acc = jax.lax.scan(step, (params, opt_state, jnp.zeros(2)), (xs, ys))[0]
        return (p, s, acc) if sums else (p, s)
    return epoch


def interleaved(contenders, rounds):
    """Median wall-clock and median process CPU seconds per contender (the CPU time is the
    steadier one on a machine shared with other jobs)."""
    for f in contenders.values():
        f()
    wall, cpu = {n: [] for n in contenders}, {n: [] for n in contenders}
    names = list(contenders)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            contenders[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return ({n: statistics.median(t) for n, t in wall.items()},
            {n: statistics.median(t) for n, t in cpu.items()})


def main(rounds):
    model, x, y = setup()
    key = jax.random.PRNGKey(0)
    opt = optax.sgd(0.01)
    params, state, _ = model.init(key, (BATCH, SIZES[0]))
    xs, ys = x.reshape(STEPS, BATCH, -1), y.reshape(STEPS, BATCH)
    kw = dict(epochs=EPOCHS, batch_size=BATCH, loop=train.Loop(shuffle=False, progress=False))
    fnn_sgd = optim.sgd(0.01)

    def bare(optimizer, sums=False):
        epoch = bare_epoch(model, state, optimizer, sums)

        def run():
            p, s = params, optimizer.init(params)
            for _ in range(EPOCHS):
                p, s, *acc = epoch(p, s, xs, ys)
            jax.block_until_ready(p)
        return run

    def run_fit(optimizer, **more):
        return lambda: jax.block_until_ready(
            train.fit(model, CE, optimizer, (x, y), train_state=train.create_train_state(
                model, optimizer, key, (BATCH, SIZES[0]), params=params), **kw,
                **more).train_state)

    med, cpu = interleaved({"bare lax.scan epoch, optax.sgd": bare(opt),
                       "fit, optax.sgd": run_fit(opt),
                       "bare lax.scan epoch, fnn optim.sgd": bare(fnn_sgd),
                       "fit, fnn optim.sgd": run_fit(fnn_sgd),
                       "fit, fnn optim.sgd, grad_norm=True": run_fit(
                           fnn_sgd, step=train.Step(grad_norm=True)),
                       "fit, optim.sgd(0.01) rebuilt": lambda: run_fit(optim.sgd(0.01))(),
                       "bare epoch + loss/accuracy sums, fnn sgd": bare(fnn_sgd, sums=True)},
                      rounds)
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{rounds} rounds, {EPOCHS} epochs of {STEPS} steps")
    print(f"  {'':36s} {'wall ms/epoch':>14s} {'ratio':>6s} {'CPU ms/epoch':>13s} {'ratio':>6s}"
          "   (ratio: to the bare epoch with the same optimizer)")
    for name, t in med.items():
        base = "bare lax.scan epoch, " + ("optax.sgd" if "optax" in name else "fnn optim.sgd")
        print(f"  {name:36s} {1e3 * t / EPOCHS:14.3f} {t / med[base]:6.2f} "
              f"{1e3 * cpu[name] / EPOCHS:13.3f} {cpu[name] / cpu[base]:6.2f}")
    t0 = time.perf_counter()
    run_fit(optim.sgd(0.02))()
    print(f"  first fit with optim.sgd(0.02) (new rate, same program): "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    main(ap.parse_args().rounds)
