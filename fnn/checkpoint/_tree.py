"""A checkpoint's tree: its leaves' names, and the description a checkpoint keeps in its
metadata (``fnn.tree``): write, check, rebuild. Shared by :mod:`fnn.checkpoint` and
:mod:`fnn.sharding.checkpoint`.

A description is JSON: ``{"t": "none"}``, ``{"t": "leaf", "name", "py"?, "key_impl"?}``,
``{"t": "dict", "k": keys, "c": children}``, ``{"t": "list" | "tuple", "c"}``,
``{"t": "namedtuple", "type", "k": fields, "c"}`` and ``{"t": "opaque", "type", "names"}``
(a pytree node fnn cannot rebuild without ``like=``). Read from a file, it is untrusted:
:func:`check` accepts exactly these nodes and fields, at most ``MAX_DEPTH`` deep, every array of
the file named by exactly one leaf, before :func:`rebuild` touches it. Nothing in it selects a
type or function by name beyond the fixed tables below (``bool``/``int``/``float`` scalars and
JAX's three PRNG implementations); a namedtuple is rebuilt as a fresh ``collections.namedtuple``
of that name and fields, never imported.
"""
from __future__ import annotations

import collections
import keyword

import jax
import jax.numpy as jnp
import numpy as np

MAX_DEPTH = 64                      # fnn's own trees (TrainState, optax chains) nest < 20 deep
PY_TYPES = {"bool": bool, "int": int, "float": float}
INT_CODES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}  # int() cannot fail
KEY_IMPLS = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 4}      # words of key data (uint32)
_FIELDS = {"none": ({"t"}, set()), "leaf": ({"t", "name"}, {"py", "key_impl"}),
           "dict": ({"t", "k", "c"}, set()), "list": ({"t", "c"}, set()),
           "tuple": ({"t", "c"}, set()), "namedtuple": ({"t", "type", "k", "c"}, set()),
           "opaque": ({"t", "type", "names"}, set())}


def is_key(a) -> bool:
    """True for a typed PRNG key array (or its ``ShapeDtypeStruct``)."""
    return hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def key_impl(leaf):
    """The PRNG implementation of a typed key array or its ``ShapeDtypeStruct``."""
    try:
        return str(jax.random.key_impl(leaf))
    except TypeError:
        return getattr(getattr(leaf.dtype, "_impl", None), "name", None)


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_names(tree) -> tuple[list, list[str]]:
    """Leaves and their names: key paths joined by ``/`` (``params/0/w``), or
    ``jax.tree_util.keystr`` if that would make two names equal."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = ["/".join(_key_name(k) for k in path) or "value" for path, _ in flat]
    if len(set(names)) != len(names):
        names = [jax.tree_util.keystr(path) or "value" for path, _ in flat]
    return [leaf for _, leaf in flat], names


def like_spec(leaf):
    """``(shape, dtype name)`` a ``like=`` leaf asks for (a typed key: its key data's); a Python
    scalar asks for ``((), None)``: any stored scalar."""
    if is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    if isinstance(leaf, (bool, int, float)):
        return (), None
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return tuple(shape), np.dtype(leaf.dtype).name


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def describe(tree, names: list):
    """The tree's shape as JSON, leaves replaced by their names (consumed in flatten order)."""
    if tree is None:
        return {"t": "none"}
    if isinstance(tree, dict):
        keys = sorted(tree)
        return {"t": "dict", "k": keys, "c": [describe(tree[k], names) for k in keys]}
    if _is_namedtuple(tree):
        cls = type(tree)
        return {"t": "namedtuple", "type": f"{cls.__module__}.{cls.__qualname__}",
                "k": list(cls._fields), "c": [describe(v, names) for v in tree]}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {"t": kind, "c": [describe(v, names) for v in tree]}
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
        node = {"t": "leaf", "name": names.pop(0)}
        if type(tree) in (bool, int, float):    # not np.float64, a subclass of float
            node["py"] = type(tree).__name__
        if is_key(tree):
            node["key_impl"] = key_impl(tree)
        return node
    return {"t": "opaque", "type": type(tree).__qualname__,
            "names": [names.pop(0) for _ in jax.tree.leaves(tree)]}


# --------------------------------------------------------------------------- reading


class TreeError(ValueError):
    """A tree description fnn does not write (the caller adds the file's name)."""


def short(x, n=60) -> str:
    """``repr(x)`` cut to ``n`` characters, for error messages about untrusted values."""
    try:
        r = repr(x)
    except RecursionError:
        return "<nested too deep to show>"
    return r if len(r) <= n else r[:n] + "..."


def _is_name(s) -> bool:
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s)


def _node_fields(node, depth):
    if depth > MAX_DEPTH:
        raise TreeError(f"the tree description is nested more than {MAX_DEPTH} deep")
    if not (isinstance(node, dict) and isinstance(node.get("t"), str) and node["t"] in _FIELDS):
        what = node.get("t") if isinstance(node, dict) else node
        raise TreeError(f"unknown node type {short(what)} in the tree description")
    required, optional = _FIELDS[node["t"]]
    if not required <= set(node) <= required | optional:
        raise TreeError(f"a {node['t']!r} node with fields {sorted(node)[:8]} (expected "
                        f"{sorted(required)}" + (f" and optionally {sorted(optional)})"
                                                  if optional else ")"))
    return node["t"]


def _check_keys(node):
    t, c, k = node["t"], node["c"], node["k"]
    if not isinstance(k, list) or len(k) != len(c):
        raise TreeError(f"a {t!r} node whose keys {short(k)} do not match its {len(c)} children")
    if t == "dict":
        ok = all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in k)
        if not ok or len(set(k)) != len(k):
            raise TreeError(f"a 'dict' node with keys {short(k)} (need distinct str/int keys)")
        return
    typ = node["type"]
    if not (isinstance(typ, str) and _is_name(typ.rsplit(".", 1)[-1])):
        raise TreeError(f"a namedtuple type name {short(node['type'])} that is not a name")
    if not all(_is_name(x) and not x.startswith("_") for x in k) or len(set(k)) != len(k):
        raise TreeError(f"namedtuple field names {short(k)} (need distinct names not "
                        f"starting with '_')")


def _check_leaf(node, entries, used):
    name = node["name"]
    if not isinstance(name, str) or name not in entries:
        raise TreeError(f"a leaf names the array {short(name)}, which is not in the file")
    if name in used:
        raise TreeError(f"the array {short(name)} is named by more than one leaf")
    used.add(name)
    dtype, shape = entries[name]["dtype"], entries[name]["shape"]
    if "py" in node and not (isinstance(node["py"], str) and node["py"] in PY_TYPES):
        raise TreeError(f"leaf {name!r}: unknown Python type {short(node['py'])} "
                        f"(fnn writes {sorted(PY_TYPES)})")
    if "py" in node and shape != []:
        raise TreeError(f"leaf {name!r}: a Python scalar stored with shape {shape}")
    if node.get("py") == "int" and dtype not in INT_CODES:
        raise TreeError(f"leaf {name!r}: a Python int stored as {dtype} (fnn stores ints as "
                        f"integers)")
    if "key_impl" in node:
        words = KEY_IMPLS.get(node["key_impl"]) if isinstance(node["key_impl"], str) else None
        if words is None:
            raise TreeError(f"leaf {name!r}: unknown PRNG implementation "
                            f"{short(node['key_impl'])} (fnn knows {sorted(KEY_IMPLS)})")
        if dtype != "U32" or shape[-1:] != [words]:
            raise TreeError(f"leaf {name!r}: {node['key_impl']} key data must be U32 of shape "
                            f"(..., {words}), got {dtype} {shape}")


def check(tree, entries: dict):
    """Raise :class:`TreeError` unless ``tree`` is a description fnn writes for ``entries``
    (``{name: {"dtype", "shape", ...}}``, already checked): iterative, so any depth is safe."""
    used, todo = set(), [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        t = _node_fields(node, depth)
        if t == "leaf":
            _check_leaf(node, entries, used)
        elif t == "opaque":
            names = node["names"]
            if not isinstance(names, list) or not isinstance(node["type"], str):
                raise TreeError(f"an 'opaque' node with names {short(names)}")
            for n in names:
                _check_leaf({"t": "leaf", "name": n}, entries, used)
        elif t != "none":
            if not isinstance(node["c"], list):
                raise TreeError(f"a {t!r} node whose children are {short(node['c'])}")
            if "k" in node:
                _check_keys(node)
            todo.extend((c, depth + 1) for c in node["c"])
    unused = sorted(set(entries) - used)
    if unused:
        raise TreeError(f"arrays in the file but not in the tree description: {short(unused)}")


def rebuild(node, arrays: dict):
    """The pytree a checked description stands for, with ``arrays[name]`` at the leaves."""
    t = node["t"]
    if t == "none":
        return None
    if t == "leaf":
        a = arrays[node["name"]]
        if "key_impl" in node:
            return jax.random.wrap_key_data(jnp.asarray(a), impl=node["key_impl"])
        return PY_TYPES[node["py"]](a) if "py" in node else a
    if t == "opaque":
        raise TreeError(f"cannot rebuild a pytree node of type {short(node['type'])} without "
                        f"like=; pass a tree of that structure as like=")
    children = [rebuild(c, arrays) for c in node["c"]]
    if t == "dict":
        return dict(zip(node["k"], children))
    if t == "list":
        return children
    if t == "tuple":
        return tuple(children)
    return collections.namedtuple(node["type"].rsplit(".", 1)[-1], node["k"])(*children)
