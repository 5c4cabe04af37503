"""PyTorch weights (a ``state_dict``, or a file of one) into an fnn model, and back out.

:func:`load_state_dict` walks the fnn model the way PyTorch names a module tree: a ``serial``
(or ``parallel``) child ``n`` is PyTorch's submodule ``n`` — ``nn.Sequential`` numbers its
children ``0, 1, ...`` and so does ``serial`` — so ``serial(Dense(8), Relu(), Dense(3))`` reads
``0.weight, 0.bias, 2.weight, 2.bias``; ``residual`` and ``tied`` add no level; ``stack(layer,
n)`` reads copy ``i`` (fnn path ``<path>/i``) from ``<prefix>.i`` (``nn.ModuleList``,
``nn.TransformerEncoder``'s ``layers``), or, when its torch name holds ``{i}``, from that name
with ``i`` put in (torchvision ViT's ``encoder.layers.encoder_layer_{i}``); a recurrent layer
reads PyTorch's ``*_l0`` weights (``Bidirectional``: ``*_l0`` and ``*_l0_reverse``), and a
mapping to ``"name[k]"`` reads layer ``k`` of a multi-layer ``nn.LSTM`` (``*_lk``), so
``serial(LSTM(h), LSTM(h))`` loads ``nn.LSTM(..., num_layers=2)`` with ``mapping={"0":
"lstm[0]", "1": "lstm[1]"}``; ``MLP`` reads ``nn.Sequential(Linear, act, Linear)`` (``0``,
``2``), ``GatedMLP`` HF Llama's ``gate_proj``, ``up_proj``, ``down_proj``; ``TransformerBlock``
reads ``nn.TransformerEncoderLayer`` (``self_attn``, ``linear1``, ``linear2``, ``norm1``,
``norm2``; ``norm_first=True`` is fnn's ``norm="pre"``; build it with ``activation="gelu"``,
fnn's default, or give the fnn block PyTorch's ``relu``). ``mapping={fnn_path: torch_prefix}``
renames any node: an fnn path is the parameter keys joined by ``/`` (``"0"``, ``"encoder/2"``,
``"attn/mha"``), a torch prefix the dotted module name (``"features.0"``, ``""`` for the root).

**Declarations.** A composed model says how PyTorch names and stores it in its ``meta`` (keys
are fnn paths relative to the declaring layer, ``""`` the layer itself; ``<path>/{i}/...``
applies to every copy of a ``stack``; an enclosing layer's declaration wins over an inner one):

- ``meta["torch_names"] = {path: torch name}`` (relative; ``""``: the part adds no level —
  :func:`fnn.models.ResNet`'s blocks map ``residual/main/conv1`` to ``conv1``); a layer with
  children that declares names is walked as a ``serial`` of them.
- ``meta["torch_layout"] = {path: layout}`` (or ``layout=`` here, which wins): ``Dense`` (and
  ``MLP``/``GatedMLP`` parts) ``"linear"`` (default, ``nn.Linear``, weight ``(out, in)``) or
  ``"conv1d"`` (HF GPT-2's ``Conv1D``, weight ``(in, out)``); ``MultiHeadAttention``
  ``"packed"`` (default, ``nn.MultiheadAttention``), a dict of Linear submodules relative to the
  attention's name (Llama ``{"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}``,
  BERT ``{"q": "self.query", ..., "o": "output.dense"}``) or a fused projection split into q, k,
  v (GPT-2 ``{"qkv": "c_attn", "o": "c_proj", "format": "conv1d"}``, ``c_attn.weight (d, 3d)``);
  ``PositionalEmbedding``, ``ClassToken``, ``PRelu`` and any one-parameter layer
  ``"embedding"`` (default: ``<name>.weight``) or ``"parameter"`` (the name *is* the tensor:
  torchvision's ``encoder.pos_embedding (1, n, d)``, ``class_token (1, 1, d)``). A layout is
  never guessed from shapes: a square ``(in, out)`` weight loads transposed unless declared.
- ``meta["torch_tied"] = {alias key: source key}`` (relative to the layer's torch name; GPT-2's
  ``{"lm_head.weight": "transformer.wte.weight"}``): the alias may be absent; if present it must
  equal the source. A ``tied`` combinator's target is such an alias too.

The tensors are converted by the rules :mod:`fnn.torch_weights._layers` lists (the layers'
docstrings give the same). A ``Dense`` right after a ``Flatten`` of a channels-last feature map
gets its input columns reordered from PyTorch's channels-first flattening, so a CNN whose input
is transposed from NCHW to NHWC computes PyTorch's outputs. Every missing, unexpected,
mis-shaped or mis-typed (an integer or boolean tensor for a float parameter) tensor, every
tied alias that differs from its source, every wrong layout and every unused ``mapping`` or
``layout`` entry is reported at once in a :class:`StateDictError`. fnn's ``Conv`` pads
``SAME`` by default, PyTorch's ``Conv2d`` not at all (``padding=0``): the weights fit either
way, so when a tensor further on is mis-shaped (the ``Linear`` after a ``Flatten``), the error
adds a hint naming each such ``Conv``, its padding and its output shape under both paddings. A
load that succeeds gives one :class:`PaddingWarning` naming every ``Conv``/``ConvTranspose``
that pads ``SAME`` with a kernel larger than 1 (the state_dict cannot say whether PyTorch's
layer padded that way), with the numbers ``SAME`` pads there, the PyTorch padding they are, if
any, and the ``padding=`` that keeps them or gives PyTorch's default; a convolution whose
padding is declared (``"VALID"`` or numbers, as :func:`fnn.models.ResNet` declares its own) is
taken at its word.

:func:`state_dict` runs the same walk and rules backwards: fnn ``params``/``state`` to the
``state_dict`` PyTorch's module has (aliases included), bit-exact both ways.

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
from typing import Any, Mapping

import jax
import numpy as np

from fnn import checkpoint
from fnn.torch_weights import _run, _sinks
from fnn.torch_weights._padding import PaddingWarning
from fnn.torch_weights._run import StateDictError

__all__ = ["load_state_dict", "state_dict", "read_state_dict", "StateDictError",
           "PaddingWarning"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


# --------------------------------------------------------------------------- reading

def _numpy(name, t) -> np.ndarray:
    if hasattr(t, "detach"):                                       # a torch.Tensor
        t = t.detach().cpu()
        t = t.float() if str(t.dtype) == "torch.bfloat16" else t
        t = t.numpy()
    a = np.asarray(t)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_
                                 or _sinks.is_float(a.dtype)):          # bfloat16 included
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



# --------------------------------------------------------------------------- load and save

def load_state_dict(model, state_dict: Mapping[str, Any], input_shape, *,
                    mapping: Mapping[str, str] | None = None, layout: Mapping | None = None,
                    dtype=None):
    """fnn ``(params, state)`` for ``model`` from a PyTorch ``state_dict``.

    **Arguments:** ``model``: the fnn model of the same architecture; ``state_dict``: a mapping
    of names to ``torch.Tensor``s or NumPy arrays (``module.state_dict()``, or
    :func:`read_state_dict` of a file); ``input_shape``: the shape ``model.init`` takes
    (channels-last for convolutions; it fixes every parameter's shape, abstractly — no
    FLOPs); ``mapping``: ``{fnn_path: torch_prefix}`` renames; ``layout``: ``{fnn_path:
    layout}`` declares how tensors are stored (as ``meta["torch_layout"]``, see the module
    docstring; these win); ``dtype``: of the arrays returned, default fnn's default float dtype.
    **Returns:** ``(params, state)`` with exactly the structure ``model.init`` gives (a
    stateful recurrent carry and other non-weight state start at zeros).
    **Raises:** :class:`StateDictError` listing every tensor missing from ``state_dict``,
    every one the model does not use, every shape that differs (both shapes shown, in
    PyTorch's layout), every integer or boolean tensor where a float one belongs, every tied
    alias that differs from its source, every unused ``mapping``/``layout`` entry and every
    layer with parameters fnn cannot match (a ``GroupNorm`` and the like load, and a
    ``WeightNorm`` of a ``Dense`` or ``Conv``, from PyTorch's ``weight_norm(..., dim=0)``).
    **Warns:** :class:`PaddingWarning` (once per call) when a ``Conv``/``ConvTranspose`` pads
    ``"SAME"`` (fnn's default) with a kernel larger than 1: declare its padding as the PyTorch
    layer has it (``padding="VALID"`` for ``padding=0``).

    >>> import numpy as np
    >>> from fnn.layers import Dense, Relu, serial
    >>> w = np.arange(6.0).reshape(3, 2)                    # torch.nn.Linear(2, 3).weight
    >>> params, state = load_state_dict(Dense(3), {"weight": w, "bias": np.zeros(3)}, (1, 2))
    >>> print(params["w"])                                  # fnn's w is (in, out) = weight.T
    [[0. 2. 4.]
     [1. 3. 5.]]
    """
    sd = {str(k): _numpy(k, v) for k, v in state_dict.items()}
    return _run.load(model, sd, input_shape, mapping, layout, dtype)


def state_dict(model, params, state, input_shape, *, mapping: Mapping[str, str] | None = None,
               layout: Mapping | None = None, dtype=None) -> dict[str, np.ndarray]:
    """A PyTorch ``state_dict`` ``{name: NumPy array}`` from fnn ``params``/``state``: the exact
    inverse of :func:`load_state_dict` (the same names, layouts, ``mapping`` and ``layout``),
    so ``torch_module.load_state_dict({k: torch.from_numpy(v) ...})`` takes it and loading it
    back gives ``params``/``state`` bit for bit. Tied aliases are written as copies of their
    source (PyTorch's ``state_dict`` has both); a ``BatchNorm``'s ``num_batches_tracked`` is
    written as ``0`` (an int64 scalar; fnn counts no batches); a recurrent layer's bias
    ``b`` as ``bias_ih = b``, ``bias_hh = 0``; a stateful recurrent layer's carry is not a
    weight and is not written (it loads back as zeros). ``dtype``: cast every float array
    (default: as the params are). **Raises:** :class:`StateDictError` when
    ``params``/``state`` do not have the structure ``model.init(key, input_shape)`` gives, or
    a declaration is wrong.

    >>> import numpy as np
    >>> from fnn.layers import Dense
    >>> params = {"w": np.arange(6.0).reshape(2, 3), "b": np.zeros(3)}
    >>> sd = state_dict(Dense(3), params, {}, (1, 2))
    >>> sorted(sd), sd["weight"].shape                      # nn.Linear(2, 3): weight (out, in)
    (['bias', 'weight'], (3, 2))
    """
    return _run.save(model, params, state, input_shape, mapping, layout, dtype)[0]
