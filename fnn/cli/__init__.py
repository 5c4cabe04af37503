"""The ``fnn`` command (also ``python -m fnn``): list, train and gradient-check bundled tasks.

::

    fnn list
    fnn train digits-cnn [--epochs N] [--lr X] [--batch-size B] [--seed S] [--out DIR]
                         [--quiet] [--quick] [--resume] [--precision bfloat16|float16|float32]
    fnn gradcheck xor [--seed S] [--directions K]
    fnn doctor xor [--seed S] [--steps N] [--lr X]       (the debugging checklist: fnn.cli.doctor)
    fnn tune --report [--all] | --clear                 (the tuner's choices: fnn.cli.tune)

``train`` prints progress and the final test metrics and writes the checkpoint and plots to
``DIR`` (default ``out``). Its last line of output is one JSON object, ``{"task": NAME,
...metrics}`` (see :data:`JSON_HELP`), for scripts. ``--epochs``, ``--lr`` and ``--batch-size``
are checked before anything is trained: a non-positive epoch count or batch size, or a negative
or non-finite learning rate, is a usage error (exit status 2); ``--lr 0`` is taken as given.
``gradcheck`` enables float64, builds the task's small problem and
compares the hand-derived gradient (:func:`fnn.backprop.grad`) with ``jax.grad`` and both with
central finite differences along random directions (:func:`fnn.gradcheck.check_model`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import jax

from fnn.precision import policy

__all__ = ["main"]

JSON_HELP = """\
output: progress goes to stderr (nothing with --quiet); stdout ends with a summary line and
then one JSON object on the last line, for scripts, e.g.
  {"task": "digits-cnn", "test_accuracy": 0.986, "test_loss": 0.05, "errors": 5, ...}
"task" is the task's name; the other keys are the task's final metrics, measured once after
training: test_* on the held-out test set (digits-cnn, digits-mlp, xor), val_bpc or
val_bits_per_char (character models), best_epoch (the restored epoch, with early stopping),
epochs (epochs run). Example: fnn train xor --quiet | tail -n 1 | jq .test_accuracy
"""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _learning_rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite learning rate >= 0, got {text!r}")
    return value


def _precision(text):
    try:
        policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _join_processes():
    """Under ``python -m fnn.sharding.launch`` (its ``FNN_COORDINATOR`` set): join the run with
    ``jax.distributed`` before any other JAX call. ``True`` when this is one of several
    processes."""
    if not os.environ.get("FNN_COORDINATOR"):
        return False
    from fnn.sharding.launch import initialize
    return initialize()


def _devices(n):
    """A context in which ``fit`` trains data parallel on ``n`` devices (``None``: as is; every
    device of every process in a multi-process run)."""
    if jax.distributed.is_initialized():        # (process_count() would start the backend)
        n = jax.device_count() if n is None else n
        if n != jax.device_count():
            raise SystemExit(f"fnn train: --devices {n} across {jax.process_count()} processes; "
                             f"a multi-process run trains on all {jax.device_count()} devices")
    if n is None:
        return contextlib.nullcontext()
    from fnn import sharding
    try:                                # the CPU backend's device count, before it starts;
        sharding.simulate_cpu_devices(n)   # harmless where an accelerator is the backend
    except RuntimeError:
        pass                            # started already (a test, a notebook): use what is there
    if jax.device_count() < n:
        raise SystemExit(f"fnn train: --devices {n}, but this machine has "
                         f"{jax.device_count()} {jax.default_backend()} device(s)")
    return sharding.default_mesh(sharding.make_mesh((n,), ("data",),
                                                    devices=jax.devices()[:n]))


def _task_names():
    from fnn import tasks
    return tasks.names()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fnn", description="fnn: train and check the bundled "
                                 "example tasks.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the bundled tasks")
    names = _task_names()
    tr = sub.add_parser("train", help="train a task, print its test metrics, write "
                        "checkpoint and plots", epilog=JSON_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("name", metavar="NAME", help=f"the task: {', '.join(names)} "
                    f"(fnn list describes them)")
    tr.add_argument("--epochs", type=_positive_int, default=None,
                    help="epochs, >= 1 (default: the task's own)")
    tr.add_argument("--lr", type=_learning_rate, default=None,
                    help="(peak) learning rate, finite and >= 0 (default: the task's own)")
    tr.add_argument("--batch-size", type=_positive_int, default=None,
                    help="examples per step, >= 1 (default: the task's own)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", default="out", help="folder for checkpoint and plots")
    tr.add_argument("--quiet", action="store_true", help="no progress output")
    tr.add_argument("--quick", action="store_true", help="a tiny run (for smoke tests)")
    tr.add_argument("--precision", type=_precision, default=None,
                    help="a mixed-precision policy: bfloat16, float16 (dynamic loss scaling), "
                         "float32, or params=…,compute=…,output=… (fnn.precision)")
    tr.add_argument("--devices", type=_positive_int, default=None,
                    help="data parallel over N devices (simulated CPU devices where the "
                         "backend is the CPU); see docs/scaling.md")
    tr.add_argument("--resume", action="store_true", help="continue training from the "
                    "backup in OUT/ckpt (fit's callbacks=[BackupAndRestore(OUT/ckpt)])")
    tr.add_argument("--no-compile-cache", action="store_true",
                    help="do not use the persistent compilation cache (default: on, in "
                         "$FNN_CACHE_DIR or ~/.cache/fnn/jax; FNN_COMPILE_CACHE=off also "
                         "turns it off); see fnn.compilation")
    gc = sub.add_parser("gradcheck", help="check a task's hand-derived gradient against "
                        "autodiff and finite differences (float64)")
    gc.add_argument("name")
    gc.add_argument("--seed", type=int, default=0)
    gc.add_argument("--directions", type=int, default=3,
                    help="random directions per parameter array")
    from fnn.cli import doctor, tune
    doctor.add_parser(sub)
    tune.add_parser(sub)
    return ap


def _task(name):
    from fnn import tasks
    try:
        return tasks.get(name)
    except KeyError as e:
        print(f"fnn: {e.args[0]}", file=sys.stderr)
        return None


def cmd_list(args) -> int:
    from fnn import tasks
    names = tasks.names()
    width = max((len(n) for n in names), default=0)
    for n in names:
        print(f"{n.ljust(width)}  {tasks.get(n).summary}")
    for module, error in tasks.broken().items():
        print(f"fnn: task module {module!r} failed to import: {error}", file=sys.stderr)
    return 1 if tasks.broken() else 0


def cmd_train(args) -> int:
    task = _task(args.name)
    if task is None:
        return 2
    from fnn import compilation
    if not args.no_compile_cache and os.environ.get("FNN_COMPILE_CACHE", "").lower() != "off":
        compilation.enable_cache()
    t0 = time.perf_counter()
    with _devices(args.devices), compilation.CompileTimer() as compiled:
        writer = jax.process_index() == 0    # several processes: process 0 speaks and writes
        metrics = task.train(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed, out=args.out, quiet=args.quiet or not writer,
                             quick=args.quick, resume=args.resume, precision=args.precision)
    if not writer:
        return 0
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in metrics.items())
    hits = f", {compiled.cache_hits} of {compiled.compiles} from the cache" \
        if compiled.cache_hits else ""
    print(f"{task.name}: {shown} ({time.perf_counter() - t0:.1f} s, of which compiling "
          f"{compiled.seconds:.1f} s{hits}); checkpoint and plots in {args.out}/")
    print(json.dumps({"task": task.name, **metrics}))
    return 0


def _manual_vs_autodiff(model, loss, params, state, x, target):
    """Largest relative difference, per leaf, of ``backprop.grad`` against ``jax.grad``."""
    import jax
    import numpy as np
    from fnn import backprop
    manual = backprop.grad(model, loss)(params, state, x, target, train=False)
    auto = jax.grad(lambda p: loss(model.apply(p, state, x, train=False)[0], target))(params)
    rows = []
    for (path, m), a in zip(jax.tree_util.tree_flatten_with_path(manual)[0],
                            jax.tree.leaves(auto)):
        m, a = np.asarray(m, np.float64), np.asarray(a, np.float64)
        rows.append((jax.tree_util.keystr(path),
                     float(np.max(np.abs(m - a)) / max(np.max(np.abs(a)), 1e-30))))
    return rows


def cmd_gradcheck(args) -> int:
    import jax
    jax.config.update("jax_enable_x64", True)           # finite differences need float64
    from fnn import gradcheck
    from fnn.core import cast
    task = _task(args.name)
    if task is None:
        return 2
    model, loss, params, state, x, target = task.problem(args.seed)
    params, state, x = cast(params, "float64"), cast(state, "float64"), cast(x, "float64")
    target = cast(target, "float64")
    rows = _manual_vs_autodiff(model, loss, params, state, x, target)
    print(f"{task.name}: hand-derived backprop vs jax.grad (max relative difference per leaf)")
    for name, rel in rows:
        print(f"  {name:40s} {rel:.2e} {'ok' if rel < 1e-9 else 'FAIL'}")
    report = gradcheck.check_model(model, loss, params, state, x, target, mode="directional",
                                   num_directions=args.directions, seed=args.seed,
                                   raise_on_fail=False)
    print(report)
    ok = report.passed and all(rel < 1e-9 for _, rel in rows)
    print(f"{task.name}: gradcheck {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    """Entry point of the ``fnn`` console script; returns the exit status."""
    _join_processes()
    args = _parser().parse_args(argv)
    from fnn.cli.doctor import cmd_doctor
    from fnn.cli.tune import cmd_tune
    return {"list": cmd_list, "train": cmd_train, "gradcheck": cmd_gradcheck,
            "doctor": cmd_doctor, "tune": cmd_tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
