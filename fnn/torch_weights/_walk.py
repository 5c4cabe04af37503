"""The walk over an fnn model as PyTorch names its module tree (see :mod:`fnn.torch_weights`).

:class:`Walk` visits every layer with its parameter templates, fnn path, parameter keys, stack
indices and PyTorch module name, and hands each tensor rule of :mod:`._layers` (made absolute:
:class:`Bound`) to a *sink*: :mod:`._sinks`' loader reads the state_dict into fnn arrays, its
saver writes fnn arrays into a state_dict. Both see the same rules in the same order.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import jax

from fnn.core import output_shape
from fnn.torch_weights import _layers as tl

# nn.TransformerEncoderLayer's names for TransformerBlock's parts (fnn path -> torch name)
BLOCK = {"pre": {"attn/norm": "norm1", "attn/mha": "self_attn", "mlp/norm": "norm2",
                 "mlp/mlp/fc1": "linear1", "mlp/mlp/fc2": "linear2"},
         "post": {"attn/mha": "self_attn", "norm1": "norm1", "norm2": "norm2",
                  "mlp/mlp/fc1": "linear1", "mlp/mlp/fc2": "linear2"}}
RECURRENT = ("SimpleRNN", "LSTM", "GRU", "Bidirectional")
PASS = ("Activation", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Gelu", "Swish",
        "Softplus", "Softmax", "LogSoftmax", "Dropout", "SpatialDropout", "QuickGelu")
THROUGH = ("residual", "mixed_precision", "full_precision")     # the child's params, no level


class Ref(NamedTuple):
    """One fnn leaf (or, inside ``stack``, one copy of it): ``tree[keys][index]``."""
    tree: str              # "params" or "state"
    keys: tuple
    index: tuple


class Bound(NamedTuple):
    rule: tl.Rule
    refs: tuple            # Ref per rule.refs
    where: str             # "fnn layer 'path' (name)"
    tied: bool             # writes a ``tied`` target (an alias of another parameter)


def join(a, b, sep="/"):
    a, b = str(a), str(b)
    return f"{a}{sep}{b}" if a and b else (a or b)


def where(path, layer):
    return f"fnn layer {path or '<root>'!r} ({layer.name})"


def _has_leaves(tree):
    return bool(jax.tree.leaves(tree))


def _copy(tree):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), tree)


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _put(tree, keys, value):
    if not keys:
        return value
    return {**tree, keys[0]: _put(tree.get(keys[0], {}), keys[1:], value)}


class Ctx:
    """The converter's view of one layer (see :mod:`._layers`)."""

    def __init__(self, walk, pt, st, shape, path, prefix, flat_from=None, suffix="_l0"):
        self.walk, self.pt, self.st, self.in_shape = walk, pt, st, shape
        self.path, self.prefix, self.flat_from, self.suffix = path, prefix, flat_from, suffix

    @property
    def layout(self):               # read only by converters that have layouts
        return self.walk.layout_of(self.path)

    def key(self, name):
        return join(self.prefix, name, ".")

    def sub(self, rel, default):
        return self.walk.prefix_of(join(self.path, rel), join(self.prefix, default, "."))

    def sub_layout(self, rel):
        return self.walk.layout_of(join(self.path, rel)) or self.layout

    def has(self, key):
        return self.walk.sink.has(key)


class Walk:
    def __init__(self, sink, mapping=None, layout=None):
        self.sink, self.mapping, self.user_layout = sink, dict(mapping or {}), dict(layout or {})
        self.defaults, self.layouts, self.used_map, self.used_layout = {}, {}, set(), set()
        self.problems, self.aliases, self.tied_targets = [], {}, {}
        self.padded, self.hints = [], {}        # convs whose padding is not PyTorch's default

    # ------------------------------------------------------------------ declarations
    def prefix_of(self, path, fallback):
        if path in self.mapping:
            self.used_map.add(path)
            return self.mapping[path]
        return self.defaults.get(path, fallback)

    def layout_of(self, path):
        if path in self.user_layout:
            self.used_layout.add(path)
            return self.user_layout[path]
        return self.layouts.get(path)

    def declare(self, layer, path, prefix):
        """The layer's ``meta`` declarations, relative to its fnn path and torch name (an
        enclosing layer's declaration for the same path wins)."""
        names = layer.meta.get("torch_names")
        for rel, name in (names or {}).items():
            self.defaults.setdefault(join(path, rel), join(prefix, name, "."))
        for rel, lay in (layer.meta.get("torch_layout") or {}).items():
            self.layouts.setdefault(join(path, rel), lay)
        for alias, source in (layer.meta.get("torch_tied") or {}).items():
            self.aliases[join(prefix, alias, ".")] = join(prefix, source, ".")
        return names

    def expand(self, path, i):
        """Declarations for ``<path>/{i}/...`` (any copy of a stack) made for copy ``i``."""
        stem = join(path, "{i}")
        for table in (self.defaults, self.layouts):
            for k, v in list(table.items()):
                if k == stem or k.startswith(stem + "/"):
                    v = v.replace("{i}", str(i)) if isinstance(v, str) else v
                    table.setdefault(join(path, i) + k[len(stem):], v)

    # ------------------------------------------------------------------ the walk
    def emit(self, rules, layer, path, keys, index):
        at = where(path, layer)
        for r in rules:
            refs = tuple(Ref("params" if ref[0] == "p" else "state", keys + tuple(ref[1:]), index)
                         for ref in r.refs)
            tied = any((ref.keys, ref.index) in self.tied_targets for ref in refs)
            self.sink.take(self, Bound(r, refs, at, tied))

    def node(self, layer, shape, pt, st, path, keys, index, prefix, flat_from=None):
        prefix = self.prefix_of(path, prefix)
        kind = layer.kind
        level = re.fullmatch(r"(.*)\[(\d+)\]", prefix)           # "lstm[1]": layer 1 of nn.LSTM
        if level:
            if kind not in RECURRENT:
                self.problems.append(f"mapping: {prefix!r} selects a layer of a multi-layer "
                                     f"nn.RNN/LSTM/GRU, but {where(path, layer)} is not one")
                return
            prefix, level = level[1], int(level[2])
        names = self.declare(layer, path, prefix)
        args = (shape, pt, st, path, keys, index, prefix)
        if kind in THROUGH or kind == "TransformerBlock":
            if kind == "TransformerBlock":
                norm = "pre" if "attn" in pt and "norm" in pt["attn"] else "post"
                for rel, name in BLOCK[norm].items():
                    self.defaults.setdefault(join(path, rel), join(prefix, name, "."))
            return self.node(layer.children[0][1], *args, flat_from)
        if kind == "tied" or {"target", "source", "transpose"} <= set(layer.meta):
            return self.tied(layer, *args, flat_from)      # tied, or a model built as one
        if kind == "stack":
            return self.stack(layer, *args)
        if kind in ("serial", "parallel") or (names is not None and layer.children):
            (first, child), *more = layer.children
            if names is not None and not more and not (isinstance(pt, dict) and first in pt):
                return self.node(child, *args, flat_from)      # a model wrapping its child
            return self.children(layer, *args, kind != "parallel")
        if kind == "WeightNorm":
            return self.weight_norm(layer, *args, flat_from)
        if kind == "Bidirectional":
            for (name, child), suffix in zip(layer.children, (f"_l{level or 0}",
                                                              f"_l{level or 0}_reverse")):
                ctx = Ctx(self, pt[name], st[name], shape, join(path, name), prefix,
                          suffix=suffix)
                self.emit(tl.recurrent(ctx), child, join(path, name), keys + (name,), index)
            return
        self.note_padding(layer, shape, path)
        ctx = Ctx(self, pt, st, shape, path, prefix, flat_from if kind == "Dense" else None,
                  f"_l{level or 0}")
        convert = tl.CONVERTERS.get(kind)
        if convert is None and ctx.layout in ("embedding", "parameter") \
                and len(jax.tree.leaves(pt)) == 1 and isinstance(pt, dict) and len(pt) == 1 \
                and not _has_leaves(st):
            convert = tl.single
        if convert is None:
            if _has_leaves(pt) or _has_leaves(st):
                self.problems.append(f"unsupported: {where(path, layer)} has parameters but no "
                                     f"known PyTorch correspondence")
            return
        try:
            rules = convert(ctx)
        except tl.LayoutError as e:
            self.problems.append(f"layout: {where(path, layer)}: {e}")
            return
        self.emit(rules, layer, path, keys, index)

    def children(self, layer, shape, pt, st, path, keys, index, prefix, chained):
        flat_from = None
        for name, child in layer.children:
            kind = child.kind
            if flat_from is not None and kind != "Dense" and kind not in PASS:
                if _has_leaves(pt[name]):
                    self.problems.append(
                        f"unsupported: {where(join(path, name), child)} has parameters and "
                        f"follows a Flatten of a channels-last feature map; PyTorch flattened "
                        f"channels-first (put it before the Flatten)")
                flat_from = None
            before, padded = len(self.problems), len(self.padded)
            self.node(child, shape, pt[name], st[name], join(path, name), keys + (name,), index,
                      join(prefix, name, "."), flat_from if kind == "Dense" else None)
            if any(p.startswith("shape:") for p in self.problems[before:]):
                self.padding_hints(padded)
            if kind == "Dense":
                flat_from = None
            if chained:
                if kind == "Flatten" and len(shape) > 2:
                    flat_from = tuple(shape[1:])
                shape = output_shape(child, shape)

    def stack(self, layer, shape, pt, st, path, keys, index, prefix):
        child, n = layer.children[0][1], layer.meta["n"]
        cpt, cst = _copy(pt), _copy(st)
        for i in range(n):
            self.expand(path, i)
            name = prefix.replace("{i}", str(i)) if "{i}" in prefix else join(prefix, i, ".")
            self.node(child, shape, cpt, cst, join(path, i), keys, index + (i,), name)

    def weight_norm(self, layer, shape, pt, st, path, keys, index, prefix, flat_from):
        """``WeightNorm(layer)``: the wrapped layer's rules (its kernel ``w`` shaped as ``v``;
        its own layout declared at ``<path>/layer``), the kernel's rule split in ``g``, ``v``."""
        child = layer.children[0][1]
        lay = self.layout_of(join(path, "layer"))
        if child.kind not in ("Dense", "Conv") or lay not in (None, "linear"):
            self.problems.append(
                f"unsupported: {where(path, layer)}: PyTorch's weight_norm (dim=0) normalises "
                f"the output axis of an nn.Linear or nn.ConvNd weight; this WeightNorm wraps a "
                f"{child.kind}{'' if lay is None else f' laid out {lay!r}'}")
            return
        self.note_padding(child, shape, path)
        inner = {**{k: v for k, v in pt.items() if k not in ("v", "g")}, "w": pt["v"]}
        ctx = Ctx(self, inner, st, shape, join(path, "layer"), prefix,
                  flat_from if child.kind == "Dense" else None)
        try:
            rules = tl.weight_norm(Ctx(self, pt, st, shape, path, prefix),
                                   tl.CONVERTERS[child.kind](ctx))
        except tl.LayoutError as e:
            self.problems.append(f"layout: {where(path, layer)}: {e}")
            return
        self.emit(rules, layer, path, keys, index)

    def tied(self, layer, shape, pt, st, path, keys, index, prefix, flat_from):
        """``tied(layer, target, source)``: walk ``layer`` with the target put back; the target's
        tensors are an alias of the source's (optional when loading, checked equal if there)."""
        tgt, src, transpose = layer.meta["target"], layer.meta["source"], layer.meta["transpose"]
        s = _get(pt, src)
        t = jax.ShapeDtypeStruct(tuple(reversed(s.shape)) if transpose else s.shape, s.dtype)
        self.tied_targets[(keys + tuple(tgt), index)] = (keys + tuple(src), transpose)
        self.node(layer.children[0][1], shape, _put(pt, tuple(tgt), t), st, path, keys, index,
                  prefix, flat_from)

    # ------------------------------------------------------------------ padding hints
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

    def unused(self):
        """Problems for ``mapping``/``layout`` entries that named no fnn layer."""
        return ([f"mapping: {p!r} names no fnn layer of the model"
                 for p in self.mapping if p not in self.used_map]
                + [f"layout: {p!r} names no fnn layer of the model that reads a layout"
                   for p in self.user_layout if p not in self.used_layout])


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
