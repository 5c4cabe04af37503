"""PyTorch → fnn parameter conversions for one layer each (used by :mod:`fnn.torch_weights`).

Every converter is ``convert(take, pt, st, in_shape) -> (params, state)`` (``state`` ``None``:
the template's, zero-filled): ``pt``/``st`` are the
fnn layer's parameter and state *templates* (``jax.ShapeDtypeStruct`` leaves from an abstract
``init``), ``in_shape`` its input shape, and ``take(name, torch_shape)`` returns the PyTorch
tensor ``<prefix>.<name>`` as a float64 NumPy array, or zeros of ``torch_shape`` after recording
a problem (missing or mis-shaped) — so one call reports every problem at once. The layouts are
the ones the layers' docstrings give:

==================  ==============================================================
fnn                 PyTorch
==================  ==============================================================
``Dense``           ``nn.Linear``: ``w = weight.T``, ``b = bias``
``Conv``            ``nn.ConvNd``: ``w = weight.transpose(2, ..., N+1, 1, 0)`` (OI…→…IO)
``ConvTranspose``   ``nn.ConvTransposeNd``: ``weight (in, out/g, *K)`` → ``w (*K, in/g, out)``,
                    spatially flipped (fnn's transposed conv correlates the dilated input)
``BatchNorm``       ``scale, offset = weight, bias``; ``mean, var = running_mean, running_var``
``LayerNorm``       ``scale, offset = weight, bias`` (``RMSNorm``: ``scale = weight``)
``Embedding``       ``w = weight``
``SimpleRNN/LSTM``  ``wi = weight_ih_l0.T``, ``wh = weight_hh_l0.T``,
                    ``b = bias_ih_l0 + bias_hh_l0``
``GRU``             as LSTM but ``bi = bias_ih_l0``, ``bh = bias_hh_l0``
``MultiHeadAttn``   ``in_proj_weight`` split in thirds (or ``q/k/v_proj_weight``), transposed;
                    ``in_proj_bias`` split; ``o.w = out_proj.weight.T``, ``o.b = out_proj.bias``
==================  ==============================================================
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["CONVERTERS", "dense_weight"]


def _t(s) -> tuple:
    return tuple(int(d) for d in s.shape)


def dense_weight(take, pt, flat_from=None):
    """``w`` from ``nn.Linear.weight (out, in)``. ``flat_from = (*spatial, C)``: the ``Dense``
    reads a channels-last feature map flattened by ``Flatten``, whose PyTorch twin flattened
    it channels-first, so the weight's input columns are reordered from ``(C, *spatial)`` to
    ``(*spatial, C)``."""
    n_in, n_out = _t(pt["w"])
    w = take("weight", (n_out, n_in))
    if flat_from is not None and math.prod(flat_from) == n_in:
        *spatial, c = flat_from
        k = len(spatial)
        w = w.reshape(n_out, c, *spatial).transpose(0, *range(2, k + 2), 1).reshape(n_out, n_in)
    return w.T


def dense(take, pt, st, in_shape, flat_from=None):
    params = {"w": dense_weight(take, pt, flat_from)}
    if "b" in pt:
        params["b"] = take("bias", _t(pt["b"]))
    return params, {}


def _bias(take, pt, params):
    if "b" in pt:
        params["b"] = take("bias", _t(pt["b"]))
    return params, {}


def conv(take, pt, st, in_shape):
    *k, cin_g, cout = _t(pt["w"])
    n = len(k)
    w = take("weight", (cout, cin_g, *k))                          # (O, I/g, *K)
    return _bias(take, pt, {"w": w.transpose(*range(2, n + 2), 1, 0)})


def conv_transpose(take, pt, st, in_shape):
    *k, cin_g, cout = _t(pt["w"])
    n, cin = len(k), int(in_shape[-1])
    g = cin // cin_g
    w = take("weight", (cin, cout // g, *k))                       # (I, O/g, *K)
    w = w.reshape(g, cin_g, cout // g, *k).transpose(*range(3, n + 3), 1, 0, 2)
    w = np.flip(w.reshape(*k, cin_g, cout), axis=tuple(range(n)))
    return _bias(take, pt, {"w": np.ascontiguousarray(w)})


def _affine(take, pt):
    names = {"scale": "weight", "offset": "bias"}
    return {k: take(names[k], _t(v)) for k, v in pt.items()}


def norm(take, pt, st, in_shape):
    return _affine(take, pt), {}


def batch_norm(take, pt, st, in_shape):
    state = {"mean": take("running_mean", _t(st["mean"])),
             "var": take("running_var", _t(st["var"]))}
    take("num_batches_tracked", None)                   # PyTorch's counter: read, not needed
    return _affine(take, pt), state


def embedding(take, pt, st, in_shape):
    return {"w": take("weight", _t(pt["w"]))}, {}


def recurrent(take, pt, st, in_shape, suffix="_l0"):
    """SimpleRNN / LSTM (``b`` = the sum of PyTorch's two biases) and GRU (``bi``, ``bh``)."""
    (n_in, g), h = _t(pt["wi"]), _t(pt["wh"])[0]
    params = {"wi": take(f"weight_ih{suffix}", (g, n_in)).T,
              "wh": take(f"weight_hh{suffix}", (g, h)).T}
    bi, bh = take(f"bias_ih{suffix}", (g,)), take(f"bias_hh{suffix}", (g,))
    if "bi" in pt:
        params.update(bi=bi, bh=bh)
    else:
        params["b"] = bi + bh
    return params, None                  # a stateful layer's carry starts at zeros


def attention(take, pt, st, in_shape):
    """``nn.MultiheadAttention``: packed ``in_proj_weight (3E, E)`` when the query, key and
    value input widths agree (unless the state_dict has ``q_proj_weight`` instead), else
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (PyTorch's ``kdim``/``vdim``)."""
    sizes = {n: _t(pt[n]["w"]) for n in "qkv"}                     # (in, out) each
    outs = [sizes[n][1] for n in "qkv"]
    ins = {sizes[n][0] for n in "qkv"}
    if len(ins) == 1 and (take.has("in_proj_weight") or not take.has("q_proj_weight")):
        w = take("in_proj_weight", (sum(outs), ins.pop()))
        parts = np.split(w, np.cumsum(outs)[:2])
        params = {n: {"w": p.T} for n, p in zip("qkv", parts)}
    else:
        params = {n: {"w": take(f"{n}_proj_weight", sizes[n][::-1]).T} for n in "qkv"}
    if "b" in pt["q"]:
        for n, b in zip("qkv", np.split(take("in_proj_bias", (sum(outs),)), np.cumsum(outs)[:2])):
            params[n]["b"] = b
    params["o"] = {"w": take("out_proj.weight", _t(pt["o"]["w"])[::-1]).T}
    if "b" in pt["o"]:
        params["o"]["b"] = take("out_proj.bias", _t(pt["o"]["b"]))
    return params, {}


# fnn layer kind (``Layer.kind``, its constructor's name) -> converter
CONVERTERS = {
    "Dense": dense, "Conv": conv, "ConvTranspose": conv_transpose, "BatchNorm": batch_norm,
    "LayerNorm": norm, "RMSNorm": norm, "GroupNorm": norm, "InstanceNorm": norm,
    "Embedding": embedding, "SimpleRNN": recurrent, "LSTM": recurrent, "GRU": recurrent,
    "MultiHeadAttention": attention,
}
