"""``fnn tune``: the formulations the tuner (:mod:`fnn.tuning`) chose on this machine.

::

    fnn tune --report [--all]     the choices in the cache: candidates' times, rejections
    fnn tune --clear              delete the cached choices (they are measured again)

The choices are made as fnn's functions are first compiled (``fnn train``, ``fit``); this command
only reads the cache (``$FNN_TUNE_DIR`` or ``~/.cache/fnn/tune``).
"""
from __future__ import annotations

__all__ = ["add_parser", "cmd_tune"]


def add_parser(sub) -> None:
    """Register the ``tune`` subcommand on an argparse subparsers object."""
    p = sub.add_parser("tune", help="show (or clear) the formulations the tuner measured and "
                       "chose on this machine (fnn.tuning)")
    p.add_argument("--report", action="store_true", help="list the cached choices (default)")
    p.add_argument("--all", action="store_true", help="include other machines' and jaxlib "
                   "versions' entries found in the cache directory")
    p.add_argument("--clear", action="store_true", help="delete the cached choices")


def cmd_tune(args) -> int:
    from fnn import tuning
    if args.clear:
        n = tuning.cache.clear()
        print(f"fnn tune: deleted {n} cached choice(s) in {tuning.cache.directory()}")
        return 0
    print(tuning.report(all_machines=args.all))
    return 0
