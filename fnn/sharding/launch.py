"""Start N local processes that train one model together, and join them from inside.

``python -m fnn.sharding.launch -n 2 --cpu-devices 2 -- python train.py`` runs the command
``n`` times with ``FNN_COORDINATOR`` (``localhost:PORT``, a free port), ``FNN_NUM_PROCESSES``,
``FNN_PROCESS_ID`` and ``FNN_CPU_DEVICES`` set; inside, :func:`initialize` (before any other
JAX call) reads them, gives the CPU backend its devices and gloo collectives, and calls
``jax.distributed.initialize``. If one process fails the others are stopped. On a cluster skip
the launcher: start one process per host with the same variables (or call
``jax.distributed.initialize()`` with no arguments where JAX detects the cluster).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import jax

__all__ = ["initialize", "launch_local"]

_VARS = ("FNN_COORDINATOR", "FNN_NUM_PROCESSES", "FNN_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_devices: int | None = None,
               timeout: int = 120) -> bool:
    """Join a multi-process run: arguments, else the ``FNN_*`` variables the launcher sets.
    Returns ``False`` (and does nothing) when neither names a coordinator, ``True`` after
    ``jax.distributed.initialize``. ``cpu_devices`` (or ``FNN_CPU_DEVICES``): devices for the
    CPU backend of this process, with gloo collectives (call before any other JAX call)."""
    env = os.environ
    coordinator = coordinator or env.get("FNN_COORDINATOR")
    cpu = cpu_devices or (int(env["FNN_CPU_DEVICES"]) if env.get("FNN_CPU_DEVICES") else None)
    if cpu:
        jax.config.update("jax_num_cpu_devices", cpu)
    if not coordinator:
        return False
    try:
        n = int(num_processes if num_processes is not None else env["FNN_NUM_PROCESSES"])
        pid = int(process_id if process_id is not None else env["FNN_PROCESS_ID"])
    except KeyError as e:
        raise ValueError(f"fnn.sharding.initialize: coordinator {coordinator!r} given but "
                         f"not {e.args[0]} (pass num_processes= and process_id=)") from None
    if not 0 <= pid < n:
        raise ValueError(f"fnn.sharding.initialize: process id {pid} not in [0, {n})")
    if cpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, n, pid, initialization_timeout=timeout)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_local(cmd, num_processes: int, *, cpu_devices: int | None = None,
                 timeout: float | None = None, **popen) -> list[int]:
    """Run ``cmd`` (a list) as ``num_processes`` local processes of one training run; wait
    for all; return their exit codes. A failing process stops the others; past ``timeout``
    seconds all are killed (exit code ``-9``)."""
    port, env = _free_port(), dict(popen.pop("env", None) or os.environ)
    env.update(FNN_COORDINATOR=f"localhost:{port}", FNN_NUM_PROCESSES=str(num_processes))
    if cpu_devices:
        env["FNN_CPU_DEVICES"] = str(cpu_devices)
    procs = [subprocess.Popen(cmd, env=dict(env, FNN_PROCESS_ID=str(p)), **popen)
             for p in range(num_processes)]
    end = None if timeout is None else time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or (end is not None and time.monotonic() > end):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return [p.returncode for p in procs]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fnn.sharding.launch",
                                 description="run COMMAND as N local processes of one "
                                             "jax.distributed training run")
    ap.add_argument("-n", "--num-processes", "--processes", type=int, default=2)
    ap.add_argument("--cpu-devices", "--devices-per-process", type=int, default=None,
                    help="devices per process for the CPU backend (simulated)")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give a command after --")
    codes = launch_local(cmd, args.num_processes, cpu_devices=args.cpu_devices,
                         timeout=args.timeout)
    return max((abs(c) for c in codes), default=0)


if __name__ == "__main__":
    sys.exit(main())
