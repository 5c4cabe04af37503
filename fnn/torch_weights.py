"""Load PyTorch weights (a ``state_dict``, or a file of one) into an fnn model.

:func:`load_state_dict` walks the fnn model the way PyTorch names a module tree: a ``serial``
(or ``parallel``) child ``n`` is PyTorch's submodule ``n`` — ``nn.Sequential`` numbers its
children ``0, 1, ...`` and so does ``serial`` — so ``serial(Dense(8), Relu(), Dense(3))`` reads
``0.weight, 0.bias, 2.weight, 2.bias``; ``residual`` adds no level; ``stack(layer, n)`` reads
copy ``i`` (fnn path ``<path>/i``) from ``<prefix>.i`` (``nn.ModuleList``,
``nn.TransformerEncoder``'s ``layers``); a recurrent layer reads PyTorch's ``*_l0`` weights
(``Bidirectional``: ``*_l0`` and ``*_l0_reverse``), and a mapping to ``"name[k]"`` reads
layer ``k`` of a multi-layer ``nn.LSTM`` (``*_lk``), so ``serial(LSTM(h), LSTM(h))`` loads
``nn.LSTM(..., num_layers=2)`` with ``mapping={"0": "lstm[0]", "1": "lstm[1]"}``; ``MLP`` reads
``nn.Sequential(Linear, act, Linear)`` (``0``, ``2``); ``TransformerBlock`` reads
``nn.TransformerEncoderLayer`` (``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``;
``norm_first=True`` is fnn's ``norm="pre"``; build it with ``activation="gelu"``, fnn's default,
or give the fnn block PyTorch's ``relu``). ``mapping={fnn_path: torch_prefix}`` renames any
node: an fnn path is the parameter keys joined by ``/`` (``"0"``, ``"encoder/2"``,
``"attn/mha"``), a torch prefix the dotted module name (``"features.0"``, ``""`` for the root).
A composed model declares its own names in ``meta["torch_names"]`` (``{relative fnn path:
relative torch name}``, ``""``: the part adds no level — :func:`fnn.models.ResNet`'s blocks map
``residual/main/conv1`` to ``conv1``) and is walked as a ``serial`` of its children.

The tensors are transposed into fnn's layouts as :mod:`fnn._torch_layers` lists (the layers'
docstrings give the same rules). A ``Dense`` right after a ``Flatten`` of a channels-last feature
map gets its input columns reordered from PyTorch's channels-first flattening, so a CNN whose
input is transposed from NCHW to NHWC computes PyTorch's outputs. Every missing, unexpected or
mis-shaped tensor (and every unused ``mapping`` entry) is reported at once in a
:class:`StateDictError`. fnn's ``Conv`` pads ``SAME`` by default, PyTorch's ``Conv2d`` not at all
(``padding=0``): the weights fit either way, so when a tensor further on is mis-shaped (the
``Linear`` after a ``Flatten``), the error adds a hint naming each such ``Conv``, its padding and
its output shape under both paddings.

>>> import numpy as np
>>> from fnn import checkpoint
>>> from fnn.layers import Dense, Relu, serial
>>> torch_sd = {"0.weight": np.ones((8, 4)), "0.bias": np.zeros(8),    # nn.Sequential(Linear,
...             "2.weight": np.ones((3, 8)), "2.bias": np.zeros(3)}    # ReLU, Linear)
>>> path = checkpoint.save("model.safetensors", torch_sd)            # as safetensors writes it
>>> sd = read_state_dict("model.safetensors")            # or a torch.save file
>>> params, state = load_state_dict(serial(Dense(8), Relu(), Dense(3)), sd, (1, 4))
>>> params["0"]["w"].shape, params["2"]["w"].shape                  # (in, out): transposed
((4, 8), (8, 3))
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fnn import _torch_layers as tl
from fnn import checkpoint
from fnn.core import output_shape

__all__ = ["load_state_dict", "read_state_dict", "StateDictError"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# nn.TransformerEncoderLayer's names for TransformerBlock's parts (fnn path -> torch name)
_BLOCK = {"pre": {"attn/norm": "norm1", "attn/mha": "self_attn", "mlp/norm": "norm2",
                  "mlp/mlp/fc1": "linear1", "mlp/mlp/fc2": "linear2"},
          "post": {"attn/mha": "self_attn", "norm1": "norm1", "norm2": "norm2",
                   "mlp/mlp/fc1": "linear1", "mlp/mlp/fc2": "linear2"}}
_RECURRENT = ("SimpleRNN", "LSTM", "GRU", "Bidirectional")
_PASS = ("Activation", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Gelu", "Swish",
         "Softplus", "Softmax", "LogSoftmax", "Dropout", "SpatialDropout")


class StateDictError(ValueError):
    """A ``state_dict`` that does not fit the model: missing, unexpected or mis-shaped tensors."""


# --------------------------------------------------------------------------- reading

def _numpy(name, t) -> np.ndarray:
    if hasattr(t, "detach"):                                       # a torch.Tensor
        t = t.detach().cpu()
        t = t.float() if str(t.dtype) == "torch.bfloat16" else t
        t = t.numpy()
    a = np.asarray(t)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise StateDictError(f"load_state_dict: {name!r} is not a numeric tensor "
                             f"({type(t).__name__})")
    return a


def read_state_dict(path) -> dict[str, np.ndarray]:
    """Read a PyTorch ``state_dict`` file into ``{name: NumPy array}``.

    A safetensors file is read by fnn's own hardened reader (:func:`fnn.checkpoint.load`; no
    torch needed). A ``torch.save`` file (a zip archive, or a name ending ``.pt``, ``.pth``,
    ``.bin``, ``.ckpt``, ``.tar``) needs PyTorch, imported only here, and is read with
    ``torch.load(weights_only=True)`` (no arbitrary pickles); a checkpoint dict holding the
    weights under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and not path.endswith(_TORCH_SUFFIXES):
        tree = checkpoint.load(path)
        flat = {}
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            flat[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)] = leaf
        return {k: _numpy(k, v) for k, v in flat.items()}
    try:
        import torch
    except ImportError:
        raise ImportError(f"read_state_dict: {path} is a torch.save file, and reading one needs "
                          f"PyTorch (pip install torch); or save it as safetensors "
                          f"(safetensors.torch.save_file), which fnn reads without torch") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(k), Mapping):
            sd = sd[k]
    if not isinstance(sd, Mapping):
        raise StateDictError(f"read_state_dict: {path} holds a {type(sd).__name__}, not a "
                             f"state_dict (a mapping of names to tensors)")
    return {str(k): _numpy(k, v) for k, v in sd.items()}


# --------------------------------------------------------------------------- the walk

class _Take:
    """``take(name, torch_shape)`` for one PyTorch module prefix; problems go to ``walk``."""

    def __init__(self, walk, prefix, path, layer):
        self.walk, self.prefix, self.path, self.layer = walk, prefix, path, layer

    def key(self, name):
        return f"{self.prefix}.{name}" if self.prefix else name

    def has(self, name):
        return self.key(name) in self.walk.sd

    def __call__(self, name, shape):
        k, w = self.key(name), self.walk
        if shape is None:                              # optional, read if there
            w.used.add(k)
            return None
        where = f"fnn layer {self.path or '<root>'!r} ({self.layer.name})"
        if k not in w.sd:
            w.problems.append(f"missing: {k!r} {tuple(shape)} for {where}")
            return np.zeros(shape)
        w.used.add(k)
        a = w.sd[k]
        if tuple(a.shape) != tuple(shape):
            w.problems.append(f"shape: {k!r} is {tuple(a.shape)}, {where} needs "
                              f"{tuple(shape)}")
            return np.zeros(shape)
        return a.astype(np.float64)


def _join(a, b, sep):
    return f"{a}{sep}{b}" if a else str(b)


def _templates(model, shape):
    return jax.eval_shape(lambda k: model.init(k, shape)[:2],
                          jax.eval_shape(jax.random.PRNGKey, 0))


def _zeros(tree):
    return jax.tree.map(lambda s: np.zeros(s.shape), tree)


def _has_leaves(tree):
    return bool(jax.tree.leaves(tree))


def _thaw(v):
    """A constructor argument back from its frozen form in ``Layer.spec`` (``core._freeze``)."""
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], type):
        t, a = v
        if t in (list, tuple):
            return t(_thaw(b) for b in a)
        if t is dict:
            return {k: _thaw(b) for k, b in a}
        return frozenset(_thaw(b) for b in a) if t is frozenset else a
    return getattr(v, "obj", v)


class _Walk:
    def __init__(self, sd, mapping):
        self.sd, self.mapping = sd, dict(mapping or {})
        self.defaults, self.used, self.used_map, self.problems = {}, set(), set(), []
        self.padded, self.hints = [], {}        # convs whose padding is not PyTorch's default

    def note_padding(self, layer, shape, path):
        """Remember a Conv/ConvTranspose whose padding is not ``VALID``: its weights load
        whatever the padding, but its output is larger than PyTorch's ``padding=0`` one, so
        a mis-shaped tensor further on (the ``Linear`` after a ``Flatten``) may come from it."""
        args = {k: _thaw(v) for k, v in layer.spec[2]} if layer.spec else {}
        if layer.kind in ("Conv", "ConvTranspose") and args.get("padding", "VALID") != "VALID":
            self.padded.append((path, layer, tuple(shape), args))

    def padding_hints(self, upto):
        """A hint per conv remembered before a shape problem (the first ``upto``), once."""
        from fnn import layers
        for path, layer, shape, args in self.padded[:upto]:
            if path in self.hints:
                continue
            n = len(shape) - 2
            valid = output_shape(getattr(layers, layer.kind)(**{**args, "padding": "VALID"}),
                                 shape)
            self.hints[path] = (
                f"hint: {layer.kind} {path or '<root>'!r} ({layer.name}) uses padding "
                f"{args['padding']!r}: {shape} -> {output_shape(layer, shape)}; PyTorch's "
                f"{layer.kind}{n}d defaults to padding=0 (VALID): -> {valid}. If the PyTorch "
                f"layer has padding=0, build it with {layer.kind}(..., padding='VALID'); the "
                f"mis-shaped tensor above may come from this difference")

    def node(self, layer, shape, pt, st, path, prefix, flat_from=None):
        if path in self.mapping:
            self.used_map.add(path)
            prefix = self.mapping[path]
        elif path in self.defaults:
            prefix = self.defaults[path]
        kind = layer.kind
        level = re.fullmatch(r"(.*)\[(\d+)\]", prefix)           # "lstm[1]": layer 1 of nn.LSTM
        if level:
            if kind not in _RECURRENT:
                self.problems.append(f"mapping: {prefix!r} selects a layer of a multi-layer "
                                     f"nn.RNN/LSTM/GRU, but fnn layer {path or '<root>'!r} is "
                                     f"{layer.name}")
                return _zeros(pt), _zeros(st)
            prefix, level = level[1], int(level[2])
        names = layer.meta.get("torch_names")
        if names is not None:          # the layer's own torch names for its parts ("": no level)
            for rel, name in names.items():
                self.defaults.setdefault(_join(path, rel, "/"),
                                         _join(prefix, name, ".") if name else prefix)
        if kind in ("serial", "parallel") or (names is not None and layer.children):
            return self.children(layer, shape, pt, st, path, prefix, kind != "parallel")
        if kind in ("residual", "mixed_precision", "full_precision"):    # the child's params
            return self.node(layer.children[0][1], shape, pt, st, path, prefix)
        if kind == "stack":
            return self.stack(layer, shape, pt, st, path, prefix)
        if kind == "TransformerBlock":
            norm = "pre" if "attn" in pt and "norm" in pt["attn"] else "post"
            for rel, name in _BLOCK[norm].items():
                self.defaults.setdefault(_join(path, rel, "/"), _join(prefix, name, "."))
            return self.node(layer.children[0][1], shape, pt, st, path, prefix)
        if kind == "MLP":
            return self.mlp(layer, pt, path, prefix), _zeros(st)
        if kind == "Bidirectional":
            return self.bidirectional(layer, shape, pt, st, path, prefix, level or 0)
        take = _Take(self, prefix, path, layer)
        self.note_padding(layer, shape, path)
        if kind in _RECURRENT:
            return tl.recurrent(take, pt, st, shape, f"_l{level or 0}")[0], _zeros(st)
        if kind == "Dense":
            return tl.dense(take, pt, st, shape, flat_from)
        if kind in tl.CONVERTERS:
            params, state = tl.CONVERTERS[kind](take, pt, st, shape)
            return params, _zeros(st) if state is None else state
        if _has_leaves(pt) or _has_leaves(st):
            self.problems.append(f"unsupported: fnn layer {path or '<root>'!r} ({layer.name}) has "
                                 f"parameters but no known PyTorch correspondence")
        return _zeros(pt), _zeros(st)

    def children(self, layer, shape, pt, st, path, prefix, chained):
        params, state, flat_from = {}, {}, None
        for name, child in layer.children:
            kind = child.kind
            if flat_from is not None and kind != "Dense" and kind not in _PASS:
                if _has_leaves(pt[name]):
                    self.problems.append(
                        f"unsupported: fnn layer {_join(path, name, '/')!r} ({child.name}) has "
                        f"parameters and follows a Flatten of a channels-last feature map; "
                        f"PyTorch flattened channels-first (put it before the Flatten)")
                flat_from = None
            before, padded = len(self.problems), len(self.padded)
            params[name], state[name] = self.node(
                child, shape, pt[name], st[name], _join(path, name, "/"),
                _join(prefix, name, "."), flat_from if kind == "Dense" else None)
            if any(p.startswith("shape:") for p in self.problems[before:]):
                self.padding_hints(padded)
            if kind == "Dense":
                flat_from = None
            if chained:
                if kind == "Flatten" and len(shape) > 2:
                    flat_from = tuple(shape[1:])
                shape = output_shape(child, shape)
        return params, state

    def stack(self, layer, shape, pt, st, path, prefix):
        child = layer.children[0][1]
        n = layer.meta["n"]
        copy = lambda t: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), t)
        outs = [self.node(child, shape, copy(pt), copy(st), _join(path, i, "/"),
                          _join(prefix, i, ".")) for i in range(n)]
        return jax.tree.map(lambda *a: np.stack(a), *outs) if outs else (pt, st)

    def mlp(self, layer, pt, path, prefix):
        out = {}
        for name, default in (("fc1", "0"), ("fc2", "2")):
            p = _join(path, name, "/")
            tp = self.mapping.get(p, self.defaults.get(p, _join(prefix, default, ".")))
            self.used_map.update({p} & set(self.mapping))
            out[name] = tl.dense(_Take(self, tp, p, layer), pt[name], {}, None)[0]
        return out

    def bidirectional(self, layer, shape, pt, st, path, prefix, level):
        params = {}
        for (name, child), suffix in zip(layer.children, (f"_l{level}", f"_l{level}_reverse")):
            take = _Take(self, prefix, _join(path, name, "/"), child)
            params[name] = tl.recurrent(take, pt[name], st[name], shape, suffix)[0]
        return params, _zeros(st)


def load_state_dict(model, state_dict: Mapping[str, Any], input_shape, *,
                    mapping: Mapping[str, str] | None = None, dtype=None):
    """fnn ``(params, state)`` for ``model`` from a PyTorch ``state_dict``.

    **Arguments:** ``model``: the fnn model of the same architecture; ``state_dict``: a mapping
    of names to ``torch.Tensor``s or NumPy arrays (``module.state_dict()``, or
    :func:`read_state_dict` of a file); ``input_shape``: the shape ``model.init`` takes
    (channels-last for convolutions; it fixes every parameter's shape, abstractly — no
    FLOPs); ``mapping``: ``{fnn_path: torch_prefix}`` renames (see the module docstring);
    ``dtype``: of the arrays returned, default fnn's default float dtype.
    **Returns:** ``(params, state)`` with exactly the structure ``model.init`` gives (a
    stateful recurrent carry and other non-weight state start at zeros).
    **Raises:** :class:`StateDictError` listing every tensor missing from ``state_dict``,
    every one the model does not use, every shape that differs (both shapes shown, in
    PyTorch's layout), every unused ``mapping`` entry and every layer with parameters fnn
    cannot match (a ``GroupNorm`` and the like load; a ``WeightNorm`` does not).

    >>> import numpy as np
    >>> from fnn.layers import Dense, Relu, serial
    >>> w = np.arange(6.0).reshape(3, 2)                    # torch.nn.Linear(2, 3).weight
    >>> params, state = load_state_dict(Dense(3), {"weight": w, "bias": np.zeros(3)}, (1, 2))
    >>> print(params["w"])                                  # fnn's w is (in, out) = weight.T
    [[0. 2. 4.]
     [1. 3. 5.]]
    """
    sd = {str(k): _numpy(k, v) for k, v in state_dict.items()}
    walk = _Walk(sd, mapping)
    shape = tuple(input_shape)
    pt, st = _templates(model, shape)
    params, state = walk.node(model, shape, pt, st, "", "")
    walk.problems += [f"unexpected: {k!r} {tuple(sd[k].shape)} is not used by the model"
                      for k in sd if k not in walk.used]
    walk.problems += [f"mapping: {p!r} names no fnn layer of the model"
                      for p in walk.mapping if p not in walk.used_map]
    if walk.problems:
        raise StateDictError(f"load_state_dict: the state_dict does not fit {model.name} "
                             f"({len(walk.problems)} problems):\n  "
                             + "\n  ".join(walk.problems + list(walk.hints.values())))
    dtype = dtype or jnp.zeros(()).dtype
    cast = lambda a, t: jnp.asarray(a, t.dtype if jnp.issubdtype(t.dtype, jnp.integer) else dtype)
    return jax.tree.map(cast, params, pt), jax.tree.map(cast, state, st)
