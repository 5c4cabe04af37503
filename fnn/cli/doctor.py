"""``fnn doctor TASK``: the debugging checklist (:func:`fnn.debug.checklist`) on a bundled task.

::

    fnn doctor digits-mlp [--seed S] [--steps N] [--lr X]

Enables float64 (finite differences need it), builds the task's small problem (its model,
loss, fresh parameters and a small batch: ``Task.problem``), prints the report and exits with
status 1 if any finding is an error, 0 otherwise (2 for an unknown task). For a classifier the
gradients line compares the initial loss with chance: ``initial loss 2.951, chance ln 10 =
2.303``.
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


def cmd_doctor(args) -> int:
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
