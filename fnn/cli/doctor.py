"""``fnn doctor TASK``: the debugging checklist (:func:`fnn.debug.checklist`) on a bundled task.

::

    fnn doctor digits-mlp [--seed S] [--steps N] [--lr X]
    fnn doctor digits-mlp --roofline v5e

Enables float64 (finite differences need it), builds the task's small problem (its model,
loss, fresh parameters and a small batch: ``Task.problem``), prints the report and exits with
status 1 if any finding is an error, 0 otherwise (2 for an unknown task). For a classifier the
gradients line compares the initial loss with chance: ``initial loss 2.951, chance ln 10 =
2.303``. ``--roofline CHIP`` prints instead the roofline of the task's training step on a chip
(``fnn.accelerators.task_steps.roofline``, hand and autodiff): compiled for it where this
machine can (a TPU with libtpu installed, a GPU with one), else counted by the host compiler.
"""
from __future__ import annotations

import sys

__all__ = ["add_parser", "cmd_doctor"]


def add_parser(sub) -> None:
    """Register the ``doctor`` subcommand on an argparse subparsers object."""
    p = sub.add_parser("doctor", help="run the debugging checklist on a task: data, gradient "
                       "norms, hand backward vs autodiff and finite differences, overfit 10 "
                       "examples")
    p.add_argument("name", metavar="TASK")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="Adam steps of the overfit test")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of the overfit test")
    p.add_argument("--roofline", metavar="CHIP", default=None,
                   help="instead: the training step's roofline on CHIP (v4, v5e, v5p, v6e, "
                        "A100, H100): FLOPs, bytes, temporary memory, step time, MFU bound")


def cmd_doctor(args) -> int:
    if args.roofline is not None:
        from fnn.accelerators.report import print_task_roofline
        return print_task_roofline(args.name, args.roofline)
    import jax
    jax.config.update("jax_enable_x64", True)           # finite differences need float64
    from fnn import debug, tasks
    from fnn.core import cast
    try:
        task = tasks.get(args.name)
    except KeyError as e:
        print(f"fnn: {e.args[0]}", file=sys.stderr)
        return 2
    model, loss, params, state, x, target = task.problem(args.seed)
    params, state, x, target = (cast(a, "float64") for a in (params, state, x, target))
    report = debug.checklist(model, loss, (x, target), params=params, state=state,
                             key=jax.random.PRNGKey(args.seed), overfit_steps=args.steps,
                             learning_rate=args.lr)
    report.title = f"fnn doctor {task.name}"
    print(report)
    return 1 if report.errors else 0
