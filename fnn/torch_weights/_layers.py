"""PyTorch ⇄ fnn tensor rules for one layer each (used by :mod:`fnn.torch_weights`).

A converter ``convert(c) -> [Rule]`` describes, for one fnn layer, which PyTorch tensors hold
which of its parameters and how to turn one into the other, both ways: a :class:`Rule` names
PyTorch keys (absolute, ``c.key(name)``) with their shapes, fnn leaves (``("p", "q", "w")``: the
layer's ``params["q"]["w"]``; ``("s", "mean")``: ``state["mean"]``), ``to_fnn(*torch arrays) ->
fnn arrays`` and its exact inverse ``to_torch(*fnn arrays) -> torch arrays``. Loading and saving
run the same rules, so a round trip is bit-exact by construction (each pair is a permutation,
reshape, split/concatenate or flip of the same numbers; the one lossy pair is a PyTorch RNN's two
biases, which fnn holds as their sum and writes back as ``(sum, 0)``).

``c`` is the walk's view of the layer: ``c.pt``/``c.st`` (parameter and state *templates*,
``jax.ShapeDtypeStruct`` leaves), ``c.in_shape``, ``c.prefix`` (its PyTorch module name),
``c.key(name)``, ``c.layout`` (the declared ``torch_layout`` or ``None``), ``c.sub(rel,
default)`` / ``c.sub_layout(rel)`` (a part's module name and layout: declarations for the fnn
path ``<path>/<rel>`` win), ``c.has(key)`` (the state_dict has it; always ``False`` when
saving), ``c.flat_from`` and ``c.suffix``. The layouts (``c.layout``):

====================  =====================================================================
fnn                   PyTorch
====================  =====================================================================
``Dense``             ``"linear"``: ``nn.Linear``, ``w = weight.T``, ``b = bias``;
                      ``"conv1d"``: HF ``Conv1D``, ``w = weight`` (stored (in, out))
``Conv``              ``nn.ConvNd``: ``w = weight.transpose(2, ..., N+1, 1, 0)`` (OI…→…IO)
``ConvTranspose``     ``nn.ConvTransposeNd``: ``weight (in, out/g, *K)`` → ``w (*K, in/g,
                      out)``, spatially flipped (fnn's transposed conv correlates the dilated input)
``PatchEmbedding``    ``nn.Conv2d`` (stride = kernel): ``w = weight.permute(2, 3, 1, 0)``
``BatchNorm``         ``scale, offset = weight, bias``; ``mean, var = running_mean,
                      running_var``; ``num_batches_tracked`` read if there, written as 0
``LayerNorm`` …       ``scale, offset = weight, bias`` (``RMSNorm``: ``scale = weight``)
``Embedding``         ``w = weight``
``SimpleRNN/LSTM``    ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``,
                      ``b = bias_ih_l0 + bias_hh_l0`` (saved as ``(b, 0)``)
``GRU``               as LSTM but ``bi = bias_ih_l0``, ``bh = bias_hh_l0``
``MultiHeadAttn``     ``"packed"``: ``in_proj_weight`` split in thirds (or ``q/k/v_proj_weight``),
                      transposed, ``in_proj_bias`` split, ``out_proj``; a dict ``{"q", "k", "v",
                      "o"}`` of Linear submodules; ``{"qkv", "o"}``: one fused projection whose
                      output is split in ``q, k, v`` (``"format": "conv1d"``: HF GPT-2
                      ``c_attn``, weight ``(d, 3d)``)
``MLP``               ``fc1``, ``fc2`` Linear submodules ``0``, ``2`` (layout as Dense)
``GatedMLP``          ``gate_proj``, ``up_proj``, ``down_proj`` (HF Llama; layout as Dense)
``PositionalEmb.``    ``"embedding"``: ``w = weight`` (GPT-2 ``wpe``); ``"parameter"``: the
                      tensor ``(1, max_len, d)`` named by the module name itself
``ClassToken``        ``token = cls_token.reshape(-1)`` from ``(1, 1, F)``: ``"embedding"``
                      (``<name>.weight``) or ``"parameter"`` (the name itself)
``PRelu``             ``alpha = weight`` (``nn.PReLU(num_parameters=F)``)
``WeightNorm``        of a ``Dense``/``Conv`` (``weight_norm(..., dim=0)``): ``g`` =
                      ``original0`` (``(out, 1, ...)``), ``v`` = ``original1`` laid out as the
                      kernel (``"parametrizations"``); ``"weight_g"``: ``weight_g``, ``weight_v``
any one-leaf layer    with a declared ``"embedding"``/``"parameter"`` layout: the leaf as is
====================  =====================================================================
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import numpy as np

__all__ = ["CONVERTERS", "Rule", "LayoutError", "recurrent", "single", "weight_norm"]


class LayoutError(ValueError):
    """A declared ``torch_layout`` this layer does not have."""


class Rule(NamedTuple):
    keys: tuple            # absolute PyTorch keys
    shapes: tuple          # their PyTorch shapes
    refs: tuple            # fnn leaves relative to the layer: ("p", ...) params, ("s", ...) state
    to_fnn: Callable       # (*torch arrays) -> tuple of fnn arrays, in ``refs`` order
    to_torch: Callable     # (*fnn arrays) -> tuple of torch arrays, in ``keys`` order
    integer: bool = False  # the PyTorch tensors are integer counters
    optional: bool = False  # read if there (else nothing is set); always written


def _t(s) -> tuple:
    return tuple(int(d) for d in s.shape)


def _same(a):
    return a


def one(key, shape, ref, fwd=_same, inv=_same) -> Rule:
    """One PyTorch tensor ⇄ one fnn leaf."""
    return Rule((key,), (tuple(shape),), (ref,), lambda a: (fwd(a),), lambda w: (inv(w),))


def _perm(axes):
    inverse = tuple(int(i) for i in np.argsort(axes))
    return (lambda a: a.transpose(axes)), (lambda w: w.transpose(inverse))


def _transpose(a):
    return a.T


def _join(a, b):
    return f"{a}.{b}" if a and b else (a or b)


def _flat_perm(flat_from, n_in):
    """fnn row ``r`` of a ``Dense`` after a channels-last ``Flatten`` is PyTorch's input column
    ``perm[r]`` (PyTorch flattened ``(C, *spatial)``, fnn ``(*spatial, C)``)."""
    if flat_from is None or math.prod(flat_from) != n_in:
        return None
    *spatial, c = flat_from
    return np.arange(n_in).reshape(c, *spatial).transpose(*range(1, len(spatial) + 1), 0) \
        .reshape(-1)


def linear(prefix, pt, ref, fmt, flat_from=None) -> list:
    """A ``Dense``-like ``{"w": (in, out)[, "b"]}`` at fnn ``ref`` from the module ``prefix``:
    ``fmt`` ``"linear"`` (``nn.Linear``, weight ``(out, in)``) or ``"conv1d"`` (HF ``Conv1D``,
    weight ``(in, out)``)."""
    if fmt not in ("linear", "conv1d"):
        raise LayoutError(f"a Dense layout is 'linear' or 'conv1d', got {fmt!r}")
    n_in, n_out = _t(pt["w"])
    perm = _flat_perm(flat_from, n_in)
    back = None if perm is None else np.argsort(perm)
    rows = (lambda w: w) if perm is None else (lambda w: w[perm])
    unrows = (lambda w: w) if perm is None else (lambda w: w[back])
    if fmt == "linear":
        rules = [one(_join(prefix, "weight"), (n_out, n_in), ref + ("w",),
                     lambda t: rows(t.T), lambda w: unrows(w).T)]
    else:
        rules = [one(_join(prefix, "weight"), (n_in, n_out), ref + ("w",), rows, unrows)]
    if "b" in pt:
        rules.append(one(_join(prefix, "bias"), _t(pt["b"]), ref + ("b",)))
    return rules


def dense(c) -> list:
    return linear(c.prefix, c.pt, ("p",), c.layout or "linear", c.flat_from)


def conv(c) -> list:
    *k, cin_g, cout = _t(c.pt["w"])
    n = len(k)
    fwd, inv = _perm((*range(2, n + 2), 1, 0))                     # (O, I/g, *K) -> (*K, I/g, O)
    rules = [one(c.key("weight"), (cout, cin_g, *k), ("p", "w"), fwd, inv)]
    return rules + _bias(c)


def _bias(c) -> list:
    return [one(c.key("bias"), _t(c.pt["b"]), ("p", "b"))] if "b" in c.pt else []


WEIGHT_NORM = {"parametrizations": ("parametrizations.weight.original0",
                                     "parametrizations.weight.original1"),
               "weight_g": ("weight_g", "weight_v")}


def weight_norm(c, inner) -> list:
    """``WeightNorm(layer)``: PyTorch's weight normalization of ``weight`` with ``dim=0`` (the
    output axis of ``nn.Linear`` and ``nn.ConvNd``, the norm over the rest: fnn's ``g`` and
    ``v``). ``inner``: the wrapped layer's rules, its kernel at ``("p", "w")``; that rule becomes
    two, ``g`` (PyTorch ``(out, 1, ...)``) and ``v`` (laid out as the kernel). Layout
    ``"parametrizations"`` (the default: ``torch.nn.utils.parametrizations.weight_norm``,
    ``<name>.parametrizations.weight.original0``/``original1``) or ``"weight_g"`` (the older
    ``torch.nn.utils.weight_norm``: ``<name>.weight_g``/``weight_v``)."""
    fmt = c.layout or "parametrizations"
    if fmt not in WEIGHT_NORM:
        raise LayoutError(f"a WeightNorm layout is one of {sorted(WEIGHT_NORM)}, got {fmt!r}")
    g_name, v_name = WEIGHT_NORM[fmt]
    rules = []
    for r in inner:
        if r.refs != (("p", "w"),):
            rules.append(r)
            continue
        (shape,) = r.shapes
        g_shape = (shape[0],) + (1,) * (len(shape) - 1)
        rules.append(one(c.key(g_name), g_shape, ("p", "g"), lambda t: t.reshape(-1),
                         lambda g, s=g_shape: g.reshape(s)))
        rules.append(Rule((c.key(v_name),), r.shapes, (("p", "v"),), r.to_fnn, r.to_torch))
    return rules


def conv_transpose(c) -> list:
    *k, cin_g, cout = _t(c.pt["w"])
    n, cin = len(k), int(c.in_shape[-1])
    g = cin // cin_g
    order = (*range(3, n + 3), 1, 0, 2)           # (g, I/g, O/g, *K) -> (*K, I/g, g, O/g)
    back = tuple(int(i) for i in np.argsort(order))
    flip = tuple(range(n))

    def to_fnn(t):                                                # (I, O/g, *K)
        w = t.reshape(g, cin_g, cout // g, *k).transpose(order).reshape(*k, cin_g, cout)
        return np.ascontiguousarray(np.flip(w, axis=flip))

    def to_torch(w):
        w = np.flip(w, axis=flip).reshape(*k, cin_g, g, cout // g).transpose(back)
        return np.ascontiguousarray(w.reshape(cin, cout // g, *k))
    return [one(c.key("weight"), (cin, cout // g, *k), ("p", "w"), to_fnn, to_torch)] + _bias(c)


def patch_embedding(c) -> list:
    ph, pw, ch, f = _t(c.pt["w"])
    fwd, inv = _perm((2, 3, 1, 0))                                # (F, C, ph, pw) -> (ph, pw, C, F)
    return [one(c.key("weight"), (f, ch, ph, pw), ("p", "w"), fwd, inv)] + _bias(c)


def _affine(c) -> list:
    names = {"scale": "weight", "offset": "bias"}
    return [one(c.key(names[k]), _t(v), ("p", k)) for k, v in c.pt.items()]


def norm(c) -> list:
    return _affine(c)


def _no_count():
    return (np.zeros((), np.int64),)


def batch_norm(c) -> list:
    state = [one(c.key("running_mean"), _t(c.st["mean"]), ("s", "mean")),
             one(c.key("running_var"), _t(c.st["var"]), ("s", "var"))]
    count = Rule((c.key("num_batches_tracked"),), ((),), (), lambda a: (), _no_count,
                 integer=True, optional=True)            # PyTorch's counter: fnn keeps none
    return _affine(c) + state + [count]


def embedding(c) -> list:
    return [one(c.key("weight"), _t(c.pt["w"]), ("p", "w"))]


def recurrent(c, pt=None, ref=(), suffix=None) -> list:
    """SimpleRNN / LSTM (``b`` = the sum of PyTorch's two biases) and GRU (``bi``, ``bh``)."""
    pt = c.pt if pt is None else pt
    suffix = c.suffix if suffix is None else suffix
    (n_in, g), h = _t(pt["wi"]), _t(pt["wh"])[0]
    p, key = ("p",) + ref, lambda n: c.key(f"{n}{suffix}")
    rules = [one(key("weight_ih"), (g, n_in), p + ("wi",), _transpose, _transpose),
             one(key("weight_hh"), (g, h), p + ("wh",), _transpose, _transpose)]
    if "bi" in pt:
        return rules + [one(key("bias_ih"), (g,), p + ("bi",)),
                        one(key("bias_hh"), (g,), p + ("bh",))]
    return rules + [Rule((key("bias_ih"), key("bias_hh")), ((g,), (g,)), (p + ("b",),),
                         lambda bi, bh: (bi + bh,), lambda b: (b, np.zeros_like(b)))]


def _split(sizes):
    cuts = list(np.cumsum(sizes)[:-1])
    return (lambda a, axis=0: tuple(np.split(a, cuts, axis=axis))), cuts


def attention(c) -> list:
    pt, layout = c.pt, "packed" if c.layout is None else c.layout
    outs = [_t(pt[n]["w"])[1] for n in "qkv"]
    ins = {_t(pt[n]["w"])[0] for n in "qkv"}
    split, _ = _split(outs)
    bias = "b" in pt["q"]
    if isinstance(layout, Mapping):
        return _attention_modules(c, layout, outs, ins, split, bias)
    if layout != "packed":
        raise LayoutError(f"a MultiHeadAttention layout is 'packed' or a dict of module names "
                          f"({{'q', 'k', 'v', 'o'}} or {{'qkv', 'o'}}), got {layout!r}")
    rules = []
    if len(ins) == 1 and (c.has(c.key("in_proj_weight")) or not c.has(c.key("q_proj_weight"))):
        rules.append(Rule((c.key("in_proj_weight"),), ((sum(outs), next(iter(ins))),),
                          (("p", "q", "w"), ("p", "k", "w"), ("p", "v", "w")),
                          lambda t: tuple(p.T for p in split(t)),
                          lambda *ws: (np.concatenate([w.T for w in ws]),)))
    else:
        rules += [one(c.key(f"{n}_proj_weight"), _t(pt[n]["w"])[::-1], ("p", n, "w"), _transpose,
                      _transpose) for n in "qkv"]
    if bias:
        rules.append(Rule((c.key("in_proj_bias"),), ((sum(outs),),),
                          (("p", "q", "b"), ("p", "k", "b"), ("p", "v", "b")),
                          split, lambda *bs: (np.concatenate(bs),)))
    return rules + linear(c.key("out_proj"), pt["o"], ("p", "o"), "linear")


def _attention_modules(c, layout, outs, ins, split, bias) -> list:
    fmt = layout.get("format", "linear")
    keys = set(layout) - {"format"}
    if keys not in ({"q", "k", "v", "o"}, {"qkv", "o"}) or fmt not in ("linear", "conv1d") \
            or not all(isinstance(layout[k], str) for k in keys):
        raise LayoutError(f"a MultiHeadAttention layout dict names Linear modules {{'q', 'k', "
                          f"'v', 'o'}} or a fused {{'qkv', 'o'}} (strings), with an optional "
                          f"'format': 'linear' or 'conv1d'; got {dict(layout)!r}")
    rules = linear(_join(c.prefix, layout["o"]), c.pt["o"], ("p", "o"), fmt)
    if "q" in keys:
        return [r for n in "qkv" for r in linear(_join(c.prefix, layout[n]), c.pt[n], ("p", n),
                                                 fmt)] + rules
    if len(ins) != 1:
        raise LayoutError(f"a fused 'qkv' projection needs one input width for q, k and v, "
                          f"this attention has {sorted(ins)}")
    n_in, total, name = next(iter(ins)), sum(outs), _join(c.prefix, layout["qkv"])
    refs = (("p", "q", "w"), ("p", "k", "w"), ("p", "v", "w"))
    if fmt == "linear":
        w = Rule((_join(name, "weight"),), ((total, n_in),), refs,
                 lambda t: tuple(p.T for p in split(t)),
                 lambda *ws: (np.concatenate([w.T for w in ws]),))
    else:                                                         # (in, 3d): split the columns
        w = Rule((_join(name, "weight"),), ((n_in, total),), refs, lambda t: split(t, 1),
                 lambda *ws: (np.concatenate(ws, axis=1),))
    if bias:
        rules.insert(0, Rule((_join(name, "bias"),), ((total,),),
                             (("p", "q", "b"), ("p", "k", "b"), ("p", "v", "b")),
                             split, lambda *bs: (np.concatenate(bs),)))
    return [w] + rules


def mlp(c) -> list:
    return [r for name, default in (("fc1", "0"), ("fc2", "2"))
            for r in linear(c.sub(name, default), c.pt[name], ("p", name),
                            c.sub_layout(name) or "linear")]


def gated_mlp(c) -> list:
    return [r for name in ("gate", "up", "down")
            for r in linear(c.sub(name, f"{name}_proj"), c.pt[name], ("p", name),
                            c.sub_layout(name) or "linear")]


def single(c, torch_shape=None, fwd=_same, inv=_same) -> list:
    """A one-parameter layer: ``"embedding"`` (default; ``<name>.weight``) or ``"parameter"``
    (the tensor named by the module name itself), ``torch_shape`` (default the leaf's)."""
    layout = c.layout or "embedding"
    if layout not in ("embedding", "parameter"):
        raise LayoutError(f"a one-parameter layer's layout is 'embedding' or 'parameter', "
                          f"got {layout!r}")
    (leaf, spec), = c.pt.items()
    key = c.key("weight") if layout == "embedding" else c.prefix
    return [one(key, torch_shape or _t(spec), ("p", leaf), fwd, inv)]


def positional_embedding(c) -> list:
    if c.layout == "parameter":                                   # torchvision pos_embedding
        return single(c, (1,) + _t(c.pt["w"]), lambda a: a[0], lambda w: w[None])
    return single(c)


def class_token(c) -> list:
    f = _t(c.pt["token"])[0]
    return single(c, (1, 1, f), lambda a: a.reshape(f), lambda w: w.reshape(1, 1, f))


# fnn layer kind (``Layer.kind``, its constructor's name) -> converter
CONVERTERS = {
    "Dense": dense, "Conv": conv, "ConvTranspose": conv_transpose, "BatchNorm": batch_norm,
    "LayerNorm": norm, "RMSNorm": norm, "GroupNorm": norm, "InstanceNorm": norm,
    "Embedding": embedding, "TokenTypeEmbedding": embedding, "SimpleRNN": recurrent, "LSTM": recurrent, "GRU": recurrent,
    "MultiHeadAttention": attention, "MLP": mlp, "GatedMLP": gated_mlp,
    "PatchEmbedding": patch_embedding, "PositionalEmbedding": positional_embedding,
    "ClassToken": class_token, "PRelu": single,
}
