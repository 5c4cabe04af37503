"""Compile a function for an accelerator this machine does not have (ahead of time, deviceless).

With ``libtpu`` installed (``pip install fnn[tpu]``), XLA's TPU compiler runs on any host: a
TPU *topology* describes the chip, arguments are ``jax.ShapeDtypeStruct``\\ s placed on it, and
``jax.jit(f).lower(*args).compile()`` returns a TPU executable whose cost and memory analyses can
be read (it cannot run here). A GPU target needs a CUDA backend in this process; ``"cpu"``
compiles for the host.

>>> import jax.numpy as jnp
>>> from fnn.accelerators import deviceless
>>> x = jnp.ones((4, 4), jnp.float32)
>>> compiled = deviceless.compile_for(lambda a: a @ a, x, target="cpu")
>>> compiled.cost_analysis()["flops"] >= 2 * 4 ** 3
True

Nothing here loads ``libtpu`` until a TPU target is asked for: importing fnn never touches it.
Set ``JAX_PLATFORMS=cpu`` in a process that has libtpu but no TPU, or JAX's first use tries (and
fails) to open a TPU backend. ``TPU_SKIP_MDS_QUERY=1`` (set here unless set) stops libtpu asking
a cloud metadata server for the machine's TPU, and ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (likewise)
lets several processes compile at once (libtpu otherwise takes ``/tmp/libtpu_lockfile``, meant
for processes that drive a TPU, and refuses a second).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn.accelerators.chips import chip as _chip

__all__ = ["tpu_compiler_available", "sharding", "abstract", "compile_for"]


def tpu_compiler_available() -> bool:
    """Whether the ``libtpu`` package (XLA's TPU compiler) is installed; looked up, not loaded."""
    return importlib.util.find_spec("libtpu") is not None


@functools.lru_cache(maxsize=None)
def _tpu_sharding(topology: str):
    if not tpu_compiler_available():
        raise RuntimeError(f"fnn.accelerators: compiling for TPU ({topology}) needs libtpu, "
                           f"which is not installed (pip install 'fnn[tpu]')")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compiling needs no lock
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=(1, 1, 1))
    mesh = jax.sharding.Mesh(np.asarray(topo.devices[:1]), ("d",))   # one core of one chip
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def sharding(target="cpu") -> jax.sharding.Sharding:
    """A one-device sharding to compile for: ``"cpu"`` (the host), a TPU chip name (``"v5e"``,
    ``"v4"``, ``"v5p"``, ``"v6e"``: a deviceless topology; needs libtpu) or a GPU chip name
    (``"H100"``, ``"A100"``: this process's first CUDA device; ``RuntimeError`` without one)."""
    if target == "cpu":
        return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    c = _chip(target)
    if c.platform == "tpu":
        return _tpu_sharding(c.topology)
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError as e:
        raise RuntimeError(f"fnn.accelerators: compiling for {c.name} needs a CUDA GPU backend "
                           f"in this process (jax[cuda]); none is available ({e})") from None
    return jax.sharding.SingleDeviceSharding(device)


def abstract(tree, target="cpu", dtype=None):
    """``tree``'s arrays (and ``ShapeDtypeStruct``\\ s) as ``ShapeDtypeStruct``\\ s placed on
    ``target``'s sharding; floating ones cast to ``dtype`` when given (integer, boolean and key
    arrays keep theirs). Leaves without a shape and dtype (Python numbers) pass through."""
    s = sharding(target)

    def one(a):
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            return a
        dt = a.dtype
        if dtype is not None and jnp.issubdtype(dt, jnp.floating):
            dt = jnp.dtype(dtype)
        return jax.ShapeDtypeStruct(tuple(a.shape), dt, sharding=s)
    return jax.tree.map(one, tree)


def compile_for(fn, *args, target="cpu", static_argnames=(), **kwargs):
    """``jax.jit(fn, static_argnames=...).lower(*args, **kwargs).compile()`` for ``target`` (see
    :func:`sharding`), the array arguments first made abstract and placed there (their values are
    never used). Returns the ``jax.stages.Compiled``."""
    args, kwargs = abstract((args, kwargs), target)
    return jax.jit(fn, static_argnames=static_argnames).lower(*args, **kwargs).compile()
