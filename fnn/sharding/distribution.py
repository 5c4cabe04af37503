"""How a ``fit`` run is spread over devices, as one value: the mesh and the parameter rules.

>>> from fnn.sharding import Distribution, fsdp, make_mesh
>>> dist = Distribution(make_mesh((jax.device_count(),), ("data",)), params=fsdp())
>>> dist.mesh.axis_names
('data',)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax  # noqa: F401  (the doctest's namespace)
from jax.sharding import Mesh

from fnn.sharding.mesh import as_auto, check_axes

__all__ = ["Distribution"]


@dataclasses.dataclass(frozen=True, eq=False)
class Distribution:
    """Data parallel training on ``mesh`` (it needs a ``"data"`` axis: each batch is split over
    it), with the parameters laid out by the rules ``params``: ``None`` (replicated),
    :func:`fnn.sharding.fsdp`, :func:`fnn.sharding.tensor_parallel` (over a ``"model"`` axis)
    or a list of ``(regex, PartitionSpec)`` (see :mod:`fnn.sharding.rules`). The optimizer
    state follows its parameters; the model state, step and key are replicated.

    ``fit(..., distribution=Distribution(mesh, params=fsdp()))``; without it ``fit`` uses the
    mesh of an enclosing :func:`fnn.sharding.default_mesh` block, if any. The mesh is kept
    with ``Auto`` axes (:func:`fnn.sharding.as_auto`).
    """

    mesh: Mesh
    params: Any = None

    def __post_init__(self):
        mesh = as_auto(self.mesh)
        check_axes(mesh, ("data",), "Distribution: mesh")
        object.__setattr__(self, "mesh", mesh)

    @property
    def data_shards(self) -> int:
        """Devices along ``"data"``: the batch size must be a multiple of it."""
        return self.mesh.shape["data"]
