"""Training-loop benchmark: fnn.train against plain JAX (and Flax, Equinox, PyTorch if installed).

(a) small MLP 64-64-64-10, batch 32, one epoch of 100 steps: ``fnn.train.fit`` (the whole epoch
    one compiled call) against a plain-JAX jitted step called from a Python loop over the same
    batches, and a bare plain-JAX ``lax.scan`` epoch (the floor). Goal: fnn at least 3x faster
    than the loop.
(b) large MLP 784-512-512-10, batch 256: fnn's jitted train step (``make_step``, with its
    non-finite guard, gradient norm and accuracy; and a lean one without them) against a
    plain-JAX jitted step, both driven step by step; and ``fit``'s epoch against a plain-JAX
    ``lax.scan`` epoch. Goal: within 1.05x.
(c) the same models trained with Flax (linen), Equinox and PyTorch loops, where installed
    (``pip install 'fnn[bench]'``), as ratios to fnn.

All JAX contenders use ``optax.adam(1e-3)`` and float32 on CPU. Repetitions are interleaved
(every contender once per round, in rotating order); medians are reported.

    python benchmarks/bench_train.py [--quick]
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

from fnn import losses, train
from fnn.layers import Dense, Relu, serial

CE = losses.softmax_cross_entropy_with_integer_labels


def fnn_mlp(sizes):
    layers = []
    for s in sizes[1:-1]:
        layers += [Dense(s), Relu()]
    return serial(*layers, Dense(sizes[-1]))


def make_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((n, d)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, n), jnp.int32))


# --------------------------------------------------------------------------- plain JAX

def plain_init(key, sizes):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = jax.random.normal(jax.random.fold_in(key, i), (a, b), jnp.float32) * np.sqrt(2 / a)
        params.append({"w": w, "b": jnp.zeros(b, jnp.float32)})
    return params


def plain_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def plain_loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(plain_apply(params, x), y).mean()


def plain_step_fn(opt):
    @jax.jit
    def step(params, opt_state, x, y):
        loss, g = jax.value_and_grad(plain_loss)(params, x, y)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def plain_scan_epoch(opt):
    step = plain_step_fn(opt)

    @jax.jit
    def epoch(params, opt_state, xs, ys):
        def body(c, b):
            p, s, _ = step(*c, *b)
            return (p, s), None
        return jax.lax.scan(body, (params, opt_state), (xs, ys))[0]
    return epoch


# --------------------------------------------------------------------------- timing

def interleaved(contenders: dict, rounds: int) -> dict:
    """Run every contender once per round (rotating order); return median seconds each."""
    names = list(contenders)
    for f in contenders.values():                    # warm-up / compile
        f()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def report(title, medians, base, unit, per=1):
    print(f"\n{title}")
    for name, t in medians.items():
        ratio = t / medians[base]
        print(f"  {name:38s} {1e3 * t / per:9.3f} ms/{unit}   {ratio:5.2f}x {base}")


# --------------------------------------------------------------------------- (a)

def bench_small(rounds, steps=100, batch=32):
    sizes = (64, 64, 64, 10)
    x, y = make_data(steps * batch, sizes[0])
    opt = optax.adam(1e-3)
    model = fnn_mlp(sizes)
    key = jax.random.PRNGKey(0)
    state = {"ts": train.fit(model, CE, opt, (x, y), epochs=1, batch_size=batch, key=key,
                             loop=train.Loop(progress=False)).train_state}

    def fnn_epoch():
        state["ts"] = train.fit(model, CE, opt, (x, y), epochs=1, batch_size=batch,
                                train_state=state["ts"],
                                loop=train.Loop(progress=False)).train_state

    step = plain_step_fn(opt)
    perm = np.random.default_rng(1).permutation(len(x))
    batches = [(x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, len(x), batch)]
    plain = {"p": plain_init(key, sizes)}
    plain["s"] = opt.init(plain["p"])

    def plain_loop():
        p, s = plain["p"], plain["s"]
        for xb, yb in batches:
            p, s, _ = step(p, s, xb, yb)
        jax.block_until_ready(p)
        plain["p"], plain["s"] = p, s

    scan = plain_scan_epoch(opt)
    xs, ys = x[perm].reshape(steps, batch, -1), y[perm].reshape(steps, batch)

    def plain_scan():                   # the floor: the same steps, no metrics, no shuffle
        plain["p"], plain["s"] = jax.block_until_ready(scan(plain["p"], plain["s"], xs, ys))

    contenders = {"fnn fit (epoch = one compiled call)": fnn_epoch,
                  "plain JAX: jitted step, Python loop": plain_loop,
                  "plain JAX: lax.scan epoch": plain_scan}
    contenders.update(peers(sizes, batches))
    med = interleaved(contenders, rounds)
    report(f"(a) small MLP {'-'.join(map(str, sizes))}, batch {batch}, epoch of {steps} steps",
           med, "fnn fit (epoch = one compiled call)", "epoch")
    return med


# --------------------------------------------------------------------------- (b)

def bench_large(rounds, steps=20, batch=256):
    sizes = (784, 512, 512, 10)
    x, y = make_data(steps * batch, sizes[0])
    opt = optax.adam(1e-3)
    model = fnn_mlp(sizes)
    key = jax.random.PRNGKey(0)
    fstep = train.make_step(model, CE, opt)
    st = {"ts": train.create_train_state(model, opt, key, (batch, sizes[0]))}
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]

    def fnn_steps():
        ts = st["ts"]
        for b in batches:
            ts, _ = fstep(ts, b)
        st["ts"] = jax.block_until_ready(ts)

    pstep = plain_step_fn(opt)
    pl = {"p": plain_init(key, sizes)}
    pl["s"] = opt.init(pl["p"])

    def plain_steps():
        p, s = pl["p"], pl["s"]
        for xb, yb in batches:
            p, s, _ = pstep(p, s, xb, yb)
        pl["p"], pl["s"] = jax.block_until_ready((p, s))

    lean = train.make_step(model, CE, opt, guard=False, grad_norm=False, accuracy=None)
    st_lean = {"ts": st["ts"]}

    def fnn_lean():
        ts = st_lean["ts"]
        for b in batches:
            ts, _ = lean(ts, b)
        st_lean["ts"] = jax.block_until_ready(ts)

    fit_state = {"ts": st["ts"]}

    def fnn_fit():
        fit_state["ts"] = train.fit(model, CE, opt, (x, y), epochs=1, batch_size=batch,
                                    train_state=fit_state["ts"],
                                    loop=train.Loop(shuffle=False, progress=False)).train_state

    scan = plain_scan_epoch(opt)
    xs, ys = x.reshape(steps, batch, -1), y.reshape(steps, batch)

    def plain_scan():
        pl["p"], pl["s"] = jax.block_until_ready(scan(pl["p"], pl["s"], xs, ys))

    contenders = {"fnn make_step, Python loop": fnn_steps,
                  "fnn make_step lean (no guard/norm/acc)": fnn_lean,
                  "plain JAX: jitted step, Python loop": plain_steps,
                  "fnn fit (one compiled epoch)": fnn_fit,
                  "plain JAX: lax.scan epoch": plain_scan}
    contenders.update(peers(sizes, batches))
    med = interleaved(contenders, rounds)
    report(f"(b) large MLP {'-'.join(map(str, sizes))}, batch {batch}, {steps} steps per "
           f"round (times per step)", med, "fnn make_step, Python loop", "step", per=steps)
    plain = med["plain JAX: jitted step, Python loop"]
    print(f"  fnn step / plain step = {med['fnn make_step, Python loop'] / plain:.3f}   "
          f"lean step / plain step = {med['fnn make_step lean (no guard/norm/acc)'] / plain:.3f}"
          f"   fnn fit / plain scan = "
          f"{med['fnn fit (one compiled epoch)'] / med['plain JAX: lax.scan epoch']:.3f}"
          f"   (goal <= 1.05)")
    return med


# --------------------------------------------------------------------------- (c) peers

def peers(sizes, batches) -> dict:
    """Per-step training loops in Flax, Equinox and PyTorch, for whichever is installed."""
    out = {}
    for name, build in (("Flax linen", _flax), ("Equinox", _equinox), ("PyTorch", _torch)):
        try:
            out[f"{name}: step, Python loop"] = build(sizes, batches)
        except ImportError:
            print(f"  ({name} not installed: skipped; pip install 'fnn[bench]')")
    return out


def _python_loop(step, carry, batches):
    """An epoch as a peer library's users write it: ``carry = step(*carry, x, y)`` per batch in
    Python, continuing from the previous call's carry."""
    box = [carry]

    def run():
        c = box[0]
        for xb, yb in batches:
            c = step(*c, xb, yb)
        box[0] = jax.block_until_ready(c)
    return run


def _flax(sizes, batches):
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for s in sizes[1:-1]:
                x = nn.relu(nn.Dense(s)(x))
            return nn.Dense(sizes[-1])(x)

    model, opt = MLP(), optax.adam(1e-3)
    params = model.init(jax.random.PRNGKey(0), batches[0][0])

    @jax.jit
    def step(p, s, x, y):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, x), y).mean()
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return _python_loop(step, (params, opt.init(params)), batches)


def _equinox(sizes, batches):
    import equinox as eqx

    model = eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], depth=len(sizes) - 2,
                       activation=jax.nn.relu, key=jax.random.PRNGKey(0))
    opt = optax.adam(1e-3)

    @eqx.filter_jit
    def step(m, s, x, y):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
            jax.vmap(m)(x), y).mean()
        loss, g = eqx.filter_value_and_grad(loss_fn)(m)
        u, s = opt.update(g, s, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, u), s

    return _python_loop(step, (model, opt.init(eqx.filter(model, eqx.is_array))), batches)


def _torch(sizes, batches):
    import torch

    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tb = [(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y)).long())
          for x, y in batches]

    def run():
        for xb, yb in tb:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    print(f"bench_train: jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}, {rounds} interleaved rounds, medians")
    small = bench_small(rounds)
    base, loop = small["fnn fit (epoch = one compiled call)"], \
        small["plain JAX: jitted step, Python loop"]
    print(f"  plain loop / fnn fit = {loop / base:.2f}x (goal >= 3)")
    bench_large(max(3, rounds // 3) if args.quick else rounds, steps=5 if args.quick else 20)


if __name__ == "__main__":
    main()
