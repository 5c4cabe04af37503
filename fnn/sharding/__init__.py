"""Sharded training with JAX's own machinery: meshes, ``NamedSharding``s, ``jit`` with
shardings, XLA's collectives, ``jax.distributed``. No home-made communication layer.

- :mod:`~fnn.sharding.mesh`: :func:`make_mesh` (``Auto`` axes), :func:`as_auto`.
- :mod:`~fnn.sharding.rules`: parameter path → ``PartitionSpec`` rules, the :func:`fsdp` and
  :func:`tensor_parallel` presets, :func:`shard_params`, :func:`shard_opt_state`,
  :func:`train_state_shardings`.
- :mod:`~fnn.sharding.data`: :func:`shard_batch`, :func:`process_local_batch`,
  :func:`shard_dataset`, :func:`shard_shuffle` (permute within each device's shard).
- :mod:`~fnn.sharding.step`: :func:`make_sharded_step`, :func:`make_epoch`,
  :func:`sharding_table`.
- :mod:`~fnn.sharding.distribution`: :class:`Distribution` (a mesh and parameter rules: how
  ``fnn.train.fit`` spreads a run).
- :mod:`~fnn.sharding.checkpoint`: sharded, multi-process, atomic checkpoints.
- :mod:`~fnn.sharding.launch`: ``python -m fnn.sharding.launch -n 2 -- CMD`` and
  :func:`~fnn.sharding.launch.initialize` for several processes.

See ``docs/scaling.md``.
"""
from fnn.sharding.data import (batch_sharding, interleave_order, process_local_batch,
                               shard_batch, shard_dataset, shard_shuffle, take_batch)
from fnn.sharding.mesh import (as_auto, axis_size, check_axes, current_mesh, default_mesh,
                               make_mesh, replicated, simulate_cpu_devices)
from fnn.sharding.rules import (fsdp, opt_state_shardings, param_paths, param_shardings,
                                param_specs, shard_opt_state, shard_params, shard_train_state,
                                tensor_parallel, train_state_shardings)
from fnn.sharding.step import make_epoch, make_sharded_step, sharding_table
from fnn.sharding.distribution import Distribution
from fnn.sharding import checkpoint  # noqa: E402  (a submodule: sharding.checkpoint.save)


def __getattr__(name):
    """``sharding.launch`` on first use. Not a shim for an old path: importing ``launch`` here
    would make ``python -m fnn.sharding.launch`` warn (runpy's RuntimeWarning) that the module
    was imported before it ran, since ``-m`` imports this package first."""
    if name == "launch":
        import importlib
        return importlib.import_module("fnn.sharding.launch")
    raise AttributeError(f"module 'fnn.sharding' has no attribute {name!r}")


__all__ = ["make_mesh", "as_auto", "axis_size", "check_axes", "replicated", "simulate_cpu_devices",
           "default_mesh", "current_mesh",
           "param_paths", "param_specs", "param_shardings", "shard_params", "fsdp",
           "tensor_parallel", "opt_state_shardings", "shard_opt_state", "train_state_shardings",
           "shard_train_state",
           "batch_sharding", "shard_batch", "process_local_batch", "shard_shuffle", "take_batch",
           "interleave_order", "shard_dataset",
           "make_sharded_step", "make_epoch", "sharding_table", "Distribution"]
