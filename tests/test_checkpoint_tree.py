"""The checkpoint's tree description (``fnn/checkpoint/_tree.py``) where the round-trip tests
cannot see a slip: typed keys of a non-default PRNG implementation, pytree nodes fnn cannot
rebuild without ``like=``, Python keywords as namedtuple names, and how untrusted values are cut
in messages."""
import json
import re
import struct
from typing import NamedTuple

import jax
import numpy as np
import pytest

from fnn import checkpoint
from fnn.checkpoint import _tree

from test_checkpoint import _load_fails, _raw_file, _with_tree

safe_open = pytest.importorskip("safetensors").safe_open
LEAF = {"t": "leaf", "name": "w"}                      # _with_tree's one array


def _is_rbg_key(k, want):
    assert jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(k)) == "rbg"
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(k)),
                                  np.asarray(jax.random.key_data(want)))


def test_an_rbg_key_comes_back_an_rbg_key_with_and_without_like(tmp_path):
    """Not the default threefry: the implementation is read from the file (no like=) and from a
    like= of shapes only (a ShapeDtypeStruct, which jax.random.key_impl does not take)."""
    tree = {"k": jax.random.key(5, impl="rbg")}
    path = checkpoint.save(tmp_path / "k.safetensors", tree)
    _is_rbg_key(checkpoint.load(path)["k"], tree["k"])
    _is_rbg_key(checkpoint.load(path, like=jax.eval_shape(lambda: tree))["k"], tree["k"])


@jax.tree_util.register_pytree_node_class
class Box:
    def __init__(self, v):
        self.v = v

    def tree_flatten(self):
        return (self.v,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_a_node_fnn_cannot_rebuild_asks_for_like(tmp_path):
    path = checkpoint.save(tmp_path / "box.safetensors", {"b": Box(np.arange(3.0))})
    _load_fails(path, r"cannot rebuild a pytree node of type 'Box' without like=")
    got = checkpoint.load(path, like={"b": Box(np.zeros(3))})
    np.testing.assert_array_equal(got["b"].v, np.arange(3.0))


@pytest.mark.parametrize("typ,fields,match", [
    ("m.class", ["a"], "type name 'm.class'"), ("m.T", ["def"], r"field names \['def'\]")])
def test_a_python_keyword_is_no_namedtuple_name(tmp_path, typ, fields, match):
    node = {"t": "namedtuple", "type": typ, "k": fields, "c": [{"t": "leaf", "name": "w"}]}
    _load_fails(_with_tree(tmp_path, json.dumps(node)), match)


def test_untrusted_values_are_cut_at_60_characters_in_messages(tmp_path):
    for i, name in enumerate(["x" * 100, "y" * 58]):       # reprs of 102 and exactly 60
        r = repr(name)
        shown = r if len(r) <= 60 else r[:60] + "..."
        _load_fails(_with_tree(tmp_path, json.dumps({"t": "leaf", "name": name}), f"n{i}"),
                    re.escape(f"names the array {shown}, which is not in the file"))
    deep = []
    for _ in range(100_000):                              # repr recurses past the limit
        deep = [deep]
    assert _tree.short(deep) == "<nested too deep to show>"


@jax.tree_util.register_pytree_with_keys_class
class Pair:
    """A pytree whose keys are plain strings (no ``key``/``idx``/``name`` attribute)."""

    def __init__(self, left, right):
        self.left, self.right = left, right

    def tree_flatten_with_keys(self):
        return (("left", self.left), ("right", self.right)), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


class Adam(NamedTuple):
    count: np.ndarray
    mu: dict


def _names_in_file(path):
    with safe_open(str(path), "np") as f:                  # the safetensors reader's view
        return set(f.keys())


@pytest.mark.parametrize("tree,names", [
    ({"p": [np.zeros(1), (np.ones(2), {"w": np.ones(3)})], "n": Adam(np.int32(1), {"w": 1.0}),
      "c": Pair(np.zeros(1), np.ones(1))},
     {"p/0", "p/1/0", "p/1/1/w", "n/count", "n/mu/w", "c/left", "c/right"}),
    (np.arange(3.0), {"value"}),                           # a bare array: no key path
    ({"a/b": np.zeros(1), "a": {"b": np.ones(1)}}, {"['a/b']", "['a']['b']"}),   # "/" collides
])
def test_arrays_are_named_by_their_key_paths(tmp_path, tree, names):
    path = checkpoint.save(tmp_path / "t.safetensors", tree)
    assert _names_in_file(path) == names
    back = checkpoint.load(path, like=tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("node,match", [
    ({"t": "dict", "k": ["a", "b"], "c": [LEAF]}, r"keys \['a', 'b'\] do not match its 1 children"),
    ({"t": "dict", "k": [1.5], "c": [LEAF]}, r"keys \[1.5\] \(need distinct str/int keys\)"),
    ({"t": "dict", "k": [True], "c": [LEAF]}, r"keys \[True\] \(need distinct str/int keys\)"),
    ({"t": "dict", "k": ["a", "a"], "c": [LEAF, {"t": "none"}]},
     r"keys \['a', 'a'\] \(need distinct"),
])
def test_dict_keys_fnn_never_writes_are_named(tmp_path, node, match):
    _load_fails(_with_tree(tmp_path, json.dumps(node)), match)


def test_a_namedtuple_type_without_a_module_is_rebuilt(tmp_path):
    node = {"t": "namedtuple", "type": "T", "k": ["a"], "c": [LEAF]}
    got = checkpoint.load(_with_tree(tmp_path, json.dumps(node)))
    assert type(got).__name__ == "T" and got._fields == ("a",)
    np.testing.assert_array_equal(got.a, np.arange(3.0))


def _nested(depth):
    """A description whose one leaf sits ``depth`` nodes deep (lists above it)."""
    node = LEAF
    for _ in range(depth - 1):
        node = {"t": "list", "c": [node]}
    return node


def test_a_description_exactly_max_depth_deep_loads(tmp_path):
    got = checkpoint.load(_with_tree(tmp_path, json.dumps(_nested(_tree.MAX_DEPTH))))
    for _ in range(_tree.MAX_DEPTH - 1):
        (got,) = got
    np.testing.assert_array_equal(got, np.arange(3.0))
    _load_fails(_with_tree(tmp_path, json.dumps(_nested(_tree.MAX_DEPTH + 1)), "deeper"),
                f"nested more than {_tree.MAX_DEPTH} deep")


@pytest.mark.parametrize("node,match", [
    ({"t": "function", "name": "w"}, r"unknown node type 'function' in the tree description"),
    ([LEAF], r"unknown node type \[\{'t': 'leaf', 'name': 'w'\}\] in"),
    ({"t": "list", "c": [LEAF, LEAF]}, r"the array 'w' is named by more than one leaf"),
    ({"t": "leaf", "name": "w", "py": "eval"}, r"leaf 'w': unknown Python type 'eval'"),
    ({"t": "leaf", "name": "w", "key_impl": "os.system"},
     r"leaf 'w': unknown PRNG implementation 'os.system'"),
    ({"t": "leaf", "name": "w", "key_impl": "threefry2x32"},
     r"leaf 'w': threefry2x32 key data must be U32 of shape \(\.\.\., 2\), got F64 \[3\]"),
    ({"t": "leaf", "name": "w", "zz": 1},
     r"a 'leaf' node with fields \['name', 't', 'zz'\] \(expected \['name', 't'\] and "
     r"optionally \['key_impl', 'py'\]\)"),
    ({"t": "none", "zz": 1}, r"a 'none' node with fields \['t', 'zz'\] \(expected \['t'\]\)"),
    ({"t": "leaf", "name": "w", **{c: 1 for c in "abcdefgh"}},
     r"node with fields \['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'\] \(expected"),
    ({"t": "opaque", "type": "Box", "names": "w"}, r"an 'opaque' node with names 'w'"),
    ({"t": "opaque", "type": 5, "names": ["w"]}, r"an 'opaque' node with names \['w'\]"),
    ({"t": "list", "c": "w"}, r"a 'list' node whose children are 'w'"),
    ({"t": "none"}, r"arrays in the file but not in the tree description: \['w'\]"),
])
def test_messages_name_the_value_fnn_never_writes(tmp_path, node, match):
    _load_fails(_with_tree(tmp_path, json.dumps(node)), match)


def test_key_data_of_the_wrong_shape_is_refused_and_a_batch_of_keys_loads(tmp_path):
    path = checkpoint.save(tmp_path / "u.safetensors", {"w": np.zeros(3, np.uint32)})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["fnn.tree"] = json.dumps(
        {"t": "dict", "k": ["w"], "c": [{"t": "leaf", "name": "w", "key_impl": "threefry2x32"}]})
    _load_fails(_raw_file(tmp_path / "bad.safetensors", header, raw[8 + n:]),
                r"key data must be U32 of shape \(\.\.\., 2\), got U32 \[3\]")
    keys = jax.random.split(jax.random.key(0), 4)                 # key data (4, 2)
    got = checkpoint.load(checkpoint.save(tmp_path / "k.safetensors", {"k": keys}))["k"]
    assert got.shape == (4,) and jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(keys))
