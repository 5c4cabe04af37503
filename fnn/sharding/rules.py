"""Rules that map parameter paths to ``PartitionSpec``s, presets for FSDP and tensor
parallelism, and placement of params and optimizer state on a mesh.

A parameter's path is its key path joined by ``/`` (``blocks/attn/mha/q/w``, ``0/w``), as in
:mod:`fnn.checkpoint`. A *rule* is either

- a list of ``(regex, PartitionSpec)`` pairs: the first regex that ``re.search``-es the path
  gives the spec (JAX's convention: a spec shorter than the array replicates the remaining
  trailing axes); a parameter no regex matches is replicated; a regex that matches no
  parameter is an error (a typo would otherwise silently replicate); or
- a callable ``(path, shape, mesh) -> PartitionSpec | None`` (``None``: replicated).

>>> from fnn.sharding import make_mesh
>>> mesh = make_mesh((jax.device_count(), 1), ("data", "model"))
>>> params = {"embed": {"w": jnp.ones((16, 4))}, "fc1": {"w": jnp.ones((4, 8))}}
>>> rules = [(r"embed/w$", P("model", None)), (r"fc1/w$", P(None, "model"))]
>>> params = shard_params(params, mesh, rules)        # or fsdp(), tensor_parallel()
>>> params["embed"]["w"].sharding.spec
P('model', None)
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fnn.sharding.mesh import as_auto, axis_size, check_axes

__all__ = ["param_paths", "param_specs", "param_shardings", "shard_params", "fsdp",
           "tensor_parallel", "opt_state_shardings", "shard_opt_state",
           "train_state_shardings", "shard_train_state"]


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_paths(params) -> list[str]:
    """The ``/``-joined key path of every leaf of ``params``, in ``jax.tree.leaves`` order."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return ["/".join(_key(k) for k in path) for path, _ in flat]


def _spec_axes(spec):
    for entry in spec:
        for a in (entry if isinstance(entry, tuple) else (entry,)):
            if a is not None:
                yield a


def _check_spec(path, shape, spec, mesh, where):
    if len(spec) > len(shape):
        raise ValueError(f"{where}: spec {spec} for parameter {path!r} has {len(spec)} entries, "
                         f"the parameter only {len(shape)} axes (shape {tuple(shape)})")
    check_axes(mesh, tuple(_spec_axes(spec)), f"{where}: spec {spec} for parameter {path!r}")
    for dim, entry in zip(shape, spec):
        if entry is not None and dim % axis_size(mesh, entry):
            raise ValueError(f"{where}: parameter {path!r} of shape {tuple(shape)} cannot be "
                             f"split as {spec}: axis of size {dim} over mesh axis {entry!r} "
                             f"of size {axis_size(mesh, entry)}")
    return spec


def param_specs(params, mesh, rules=None, *, where="shard_params"):
    """The ``PartitionSpec`` of each parameter (a tree like ``params``) under ``rules``
    (``None``: everything replicated — plain data parallelism). Raises ``ValueError`` for a
    regex that matches no parameter, a spec naming an axis ``mesh`` lacks, or a split that
    does not divide the parameter's axis."""
    mesh = as_auto(mesh)
    leaves, treedef = jax.tree.flatten(params)
    paths = param_paths(params)
    if rules is None:
        specs = [P()] * len(leaves)
    elif callable(rules):
        specs = [rules(p, jnp.shape(a), mesh) or P() for p, a in zip(paths, leaves)]
    else:
        specs = _specs_from_list(rules, paths, where)
    specs = [_check_spec(p, jnp.shape(a), s, mesh, where)
             for p, a, s in zip(paths, leaves, specs)]
    return jax.tree.unflatten(treedef, specs)


def _specs_from_list(rules, paths, where):
    try:
        compiled = [(re.compile(rx), spec) for rx, spec in rules]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: rules must be a list of (regex, PartitionSpec) pairs or a "
                        f"callable (path, shape, mesh) -> PartitionSpec, got {rules!r}") from e
    for rx, spec in compiled:
        if not isinstance(spec, P):
            raise TypeError(f"{where}: rule {rx.pattern!r} maps to {spec!r}, not a PartitionSpec")
        if not any(rx.search(p) for p in paths):
            shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
            raise ValueError(f"{where}: rule {rx.pattern!r} matches no parameter; the "
                             f"parameters are: {shown}")
    return [next((spec for rx, spec in compiled if rx.search(p)), P()) for p in paths]


def param_shardings(params, mesh, rules=None):
    """``NamedSharding`` per parameter (a tree like ``params``) under ``rules``."""
    mesh = as_auto(mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                        is_leaf=lambda s: isinstance(s, P))


def shard_params(params, mesh, rules=None):
    """``params`` placed on ``mesh`` by ``rules`` (``jax.device_put`` with a
    ``NamedSharding`` per leaf; works for arrays held by one process as well as for global
    arrays)."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


# --------------------------------------------------------------------------- presets

def fsdp(axis: str = "data", min_size: int = 2 ** 10):
    """Fully sharded data parallelism (ZeRO-3): each parameter of at least ``min_size``
    elements is split along its largest axis that ``axis``'s size divides (the later axis on a
    tie); smaller ones are replicated. XLA all-gathers a parameter where it is used and
    reduce-scatters its gradient.

    >>> from fnn.sharding import make_mesh
    >>> mesh = make_mesh((jax.device_count(),), ("data",))
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
    >>> params = shard_params(params, mesh, fsdp("data", min_size=1024))
    >>> params["w"].sharding.spec, params["b"].sharding.spec        # b is small: replicated
    (P('data',), P())
    """
    def rule(path, shape, mesh):
        check_axes(mesh, (axis,), "fsdp")
        n = mesh.shape[axis]
        if not shape or math.prod(shape) < min_size:
            return None
        dims = [d for d in range(len(shape)) if shape[d] % n == 0]
        if not dims:
            return None
        d = max(dims, key=lambda d: (shape[d], d))
        return P(*([None] * d + [axis]))
    return rule


_ROW = re.compile(r"(^|/)(o|fc2)/w$")          # row-parallel: MHA output, MLP second layer
_ROW_BIAS = re.compile(r"(^|/)(o|fc2)/b$")
_EMBED = re.compile(r"(^|/)embed/w$")


def tensor_parallel(model_axis: str = "model"):
    """Megatron-style tensor parallelism over ``model_axis``.

    - ``MultiHeadAttention``: ``q``, ``k``, ``v`` column-parallel (``w: (F, H·d)`` split on
      its output axis, so every device holds whole heads when ``model`` divides the heads),
      ``o`` row-parallel (``w: (H·d, F)`` split on its input axis; its bias replicated).
    - transformer ``MLP``: ``fc1`` column-parallel, ``fc2`` row-parallel — the hidden
      activations stay split, one all-reduce after ``fc2``.
    - ``Embedding`` named ``embed`` (``fnn.models.GPT``): split over the vocabulary.
    - any other ``w`` (``Dense``, ``Conv``) split on its output axis, every other ``b``
      alongside (recurrent ``wi``/``wh`` stay whole; XLA keeps any such mix correct, the
      rule only decides where the work goes).
    - ``stack``ed blocks: the leading copy axis is never split (the spec is written for the
      trailing axes). An axis the model axis does not divide stays whole.
    """
    def rule(path, shape, mesh):
        check_axes(mesh, (model_axis,), "tensor_parallel")
        n, r = mesh.shape[model_axis], len(shape)
        if _ROW.search(path) and r >= 2:
            d = r - 2
        elif _ROW_BIAS.search(path):
            return None
        elif _EMBED.search(path) and r >= 2:
            d = r - 2
        elif re.search(r"(^|/)w$", path) and r >= 2:
            d = r - 1
        elif re.search(r"(^|/)b$", path) and r >= 1:
            d = r - 1
        else:
            return None
        return P(*([None] * d + [model_axis])) if shape[d] % n == 0 else None
    return rule


# --------------------------------------------------------------------------- optimizer state

def opt_state_shardings(opt_state, params_sharding, mesh):
    """Shardings for ``opt_state`` (or its ``jax.eval_shape``): every subtree with the
    structure and shapes of the params gets the params' shardings (Adam's ``mu``, ``nu``);
    any other leaf (step counts, scalars) is replicated. ``params_sharding`` holds
    ``NamedSharding``s or sharded arrays."""
    mesh = as_auto(mesh)
    is_sh = lambda a: isinstance(a, NamedSharding)
    shard = jax.tree.map(lambda a: getattr(a, "sharding", a), params_sharding, is_leaf=is_sh)
    given = jax.tree.leaves(params_sharding, is_leaf=is_sh)
    wants = [(a if is_sh(a) else a.sharding, None if is_sh(a) else tuple(jnp.shape(a)))
             for a in given]
    pstruct = jax.tree.structure(shard, is_leaf=is_sh)
    rep = NamedSharding(mesh, P())

    def like_params(x):
        if jax.tree.structure(x) != pstruct:
            return False
        return all(len(s.spec) <= jnp.ndim(a) and (want is None or tuple(jnp.shape(a)) == want)
                   for a, (s, want) in zip(jax.tree.leaves(x), wants))

    return jax.tree.map(lambda x: shard if like_params(x) else rep, opt_state,
                        is_leaf=like_params)


def shard_opt_state(optimizer, params, mesh):
    """``optimizer.init(params)`` computed in place on ``mesh``: ``jax.jit(optimizer.init,
    out_shardings=...)`` with each moment sharded like its parameter. (A plain
    ``jit(optimizer.init)`` would leave the output's placement to XLA.) ``params`` are sharded
    arrays (from :func:`shard_params`)."""
    shapes = jax.eval_shape(optimizer.init, params)
    out = opt_state_shardings(shapes, params, mesh)
    return jax.jit(optimizer.init, out_shardings=out)(params)


def train_state_shardings(train_state, mesh, rules=None):
    """A tree of ``NamedSharding``s for an ``fnn.train.TrainState`` (or anything with
    ``params``, ``opt_state`` and other fields): params by ``rules``, optimizer state like
    its params, everything else (model state, step, key) replicated."""
    mesh = as_auto(mesh)
    ps = param_shardings(train_state.params, mesh, rules)
    rep = NamedSharding(mesh, P())
    fields = {f: jax.tree.map(lambda _: rep, getattr(train_state, f))
              for f in train_state._fields}
    fields["params"] = ps
    fields["opt_state"] = opt_state_shardings(train_state.opt_state, ps, mesh)
    return type(train_state)(**fields)


def shard_train_state(train_state, mesh, rules=None):
    """``(train_state placed on mesh, its shardings)``: :func:`train_state_shardings` and
    ``jax.device_put``. Ready for :func:`fnn.sharding.make_sharded_step`.

    >>> from fnn import optim, train
    >>> from fnn.layers import Dense
    >>> from fnn.sharding import make_mesh
    >>> mesh = make_mesh((jax.device_count(), 1), ("data", "model"))
    >>> ts = train.create_train_state(Dense(8), optim.adam(1e-3), jax.random.PRNGKey(0), (4, 16))
    >>> ts, ts_sh = shard_train_state(ts, mesh, tensor_parallel())
    >>> ts_sh.params["w"].spec, ts.params["w"].sharding == ts_sh.params["w"]
    (P(None, 'model'), True)
    """
    shardings = train_state_shardings(train_state, mesh, rules)
    return jax.device_put(train_state, shardings), shardings
