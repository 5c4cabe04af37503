"""Meshes for fnn's sharded training: ``Auto`` axes, checked axis names.

fnn places arrays with ``NamedSharding``s and compiles with ``jit(in_shardings=...,
out_shardings=...)``, letting XLA's SPMD partitioner insert the collectives (GSPMD). That is
the ``Auto`` axis type. ``jax.make_mesh`` gives ``Explicit`` axes by default since JAX 0.9
(sharding in types, where an ambiguous matmul is an error to be resolved by hand); fnn takes
such a mesh and uses the same devices with ``Auto`` axes (:func:`as_auto`), so both kinds work.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "as_auto", "check_axes", "replicated", "axis_size",
           "simulate_cpu_devices", "default_mesh", "current_mesh"]

_DEFAULT = contextvars.ContextVar("fnn_default_mesh", default=None)


@contextlib.contextmanager
def default_mesh(mesh):
    """Within the block, :func:`current_mesh` returns ``mesh`` (so ``fnn.train.fit`` can use it
    when given no ``mesh=``: ``fnn train TASK --devices N`` runs a task unchanged inside
    ``with default_mesh(make_mesh((N,)))``)."""
    token = _DEFAULT.set(None if mesh is None else as_auto(mesh))
    try:
        yield mesh
    finally:
        _DEFAULT.reset(token)


def current_mesh():
    """The mesh of the innermost :func:`default_mesh` block, or ``None``."""
    return _DEFAULT.get()


def simulate_cpu_devices(n: int):
    """Give the CPU backend ``n`` devices (``jax_num_cpu_devices``), for data parallelism on
    one CPU (``fnn train TASK --devices N``). Must run before JAX's first computation;
    afterwards a ``RuntimeError`` says so (unless the backend already has ``n`` devices)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"simulate_cpu_devices: n must be a positive int, got {n!r}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        if jax.device_count() != n:
            raise RuntimeError(f"simulate_cpu_devices({n}): JAX has already started with "
                               f"{jax.device_count()} device(s); call it before any JAX "
                               f"computation (or set XLA_FLAGS=--xla_force_host_platform_"
                               f"device_count={n} in the environment)") from None


def make_mesh(shape, names=("data",), *, devices=None) -> Mesh:
    """A mesh of ``shape`` (e.g. ``(8,)`` or ``(4, 2)``) over ``names`` with ``Auto`` axes.

    >>> mesh = make_mesh((jax.device_count(), 1), ("data", "model"))   # e.g. (4, 2) on 8 devices
    >>> mesh.axis_names
    ('data', 'model')
    """
    shape, names = tuple(shape), tuple(names)
    if len(shape) != len(names):
        raise ValueError(f"make_mesh: {len(shape)} axis sizes {shape} for {len(names)} "
                         f"names {names}")
    n = len(devices) if devices is not None else jax.device_count()
    size = 1
    for s in shape:
        size *= s
    if size != n:
        raise ValueError(f"make_mesh: a mesh of shape {shape} needs {size} devices, "
                         f"there are {n} (on CPU set XLA_FLAGS=--xla_force_host_platform_"
                         f"device_count=N or jax.config.update('jax_num_cpu_devices', N) "
                         f"before JAX starts)")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def as_auto(mesh) -> Mesh:
    """``mesh`` with every axis ``Auto`` (same devices, same names); ``mesh`` itself if it
    already is. ``Manual`` axes (inside ``shard_map``) are refused."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"fnn.sharding: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    types = tuple(mesh.axis_types)
    if all(t == AxisType.Auto for t in types):
        return mesh
    if any(t == AxisType.Manual for t in types):
        raise ValueError(f"fnn.sharding: mesh axes {mesh.axis_names} include Manual ones "
                         f"({types}); give a mesh from jax.make_mesh(shape, names, "
                         f"axis_types=(jax.sharding.AxisType.Auto,) * len(names))")
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(types))


def check_axes(mesh, axes, where: str):
    """Raise ``ValueError`` naming ``where`` when a name in ``axes`` is not an axis of
    ``mesh``."""
    for a in axes:
        if a is not None and a not in mesh.axis_names:
            raise ValueError(f"{where}: mesh axis {a!r} not in the mesh, whose axes are "
                             f"{tuple(mesh.axis_names)} (shape {dict(mesh.shape)})")


def axis_size(mesh, axis) -> int:
    """Devices along ``axis`` (a name or a tuple of names)."""
    names = axis if isinstance(axis, tuple) else (axis,)
    size = 1
    for a in names:
        size *= mesh.shape[a]
    return size


def replicated(mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(as_auto(mesh), P())
