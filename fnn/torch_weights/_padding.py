"""fnn's ``"SAME"`` padding against PyTorch's fixed paddings: the warning a load gives.

A PyTorch ``ConvNd``/``ConvTransposeNd`` has a fixed padding (``padding=0`` by default, or
numbers, or ``"same"`` at stride 1); fnn's ``Conv``/``ConvTranspose`` pad ``"SAME"`` by default,
which depends on the input size and stride. The weights fit whatever the padding, so a
``state_dict`` cannot say whether the loaded model computes PyTorch's outputs. A convolution
whose padding was declared as PyTorch can have it (``"VALID"``, numbers or ``(lo, hi)`` pairs, as
:func:`fnn.models.ResNet` declares its own) is taken at its word; one that pads ``"SAME"`` with a
kernel larger than 1 (a 1×1 kernel pads nothing either way) gets one :class:`PaddingWarning` per
load naming it, the numbers ``"SAME"`` pads at this input shape, the PyTorch padding those
numbers are (if any) and the declaration that keeps them, or ``padding="VALID"`` for PyTorch's
default. A load that fails says it in its :class:`StateDictError` hint instead.
"""
from __future__ import annotations

import os
import sys
import warnings

from fnn.layers._spatial import int_tuple, padding_mode, spatial_sizes

__all__ = ["PaddingWarning", "same_padded", "warn"]

_FNN = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class PaddingWarning(UserWarning):
    """A ``Conv``/``ConvTranspose`` that pads ``"SAME"`` (fnn's default) was loaded from a
    PyTorch ``state_dict``, whose convolutions never pad by input size: declare its padding as
    the PyTorch layer has it (``padding="VALID"`` for PyTorch's default ``padding=0``,
    ``padding=p`` for ``padding=p``) to make sure the outputs agree; that also silences this
    (as does ``warnings.simplefilter("ignore", PaddingWarning)``)."""


PaddingWarning.__module__ = "fnn.torch_weights"


def _fmt(t):
    return "(" + ", ".join(str(a) for a in t) + ("," if len(t) == 1 else "") + ")"


def _declared(pads):
    """fnn's ``padding=`` that keeps ``pads`` (``(lo, hi)`` per axis), shortest form."""
    if all(lo == hi for lo, hi in pads):
        ints = tuple(lo for lo, _ in pads)
        return str(ints[0]) if len(set(ints)) == 1 else _fmt(ints)
    return _fmt(tuple(_fmt(p) for p in pads))


def _conv_line(kind, n, pads, strides, k_eff):
    """What ``pads`` of a ``Conv`` is in PyTorch's terms."""
    torch = f"{kind}{n}d"
    if all(lo == hi for lo, hi in pads):
        ints = tuple(lo for lo, _ in pads)
        p = ints[0] if len(set(ints)) == 1 else _fmt(ints)
        return f"PyTorch's {torch}(padding={p})"
    if all(s == 1 for s in strides):
        return f"PyTorch's {torch}(padding='same')"
    return f"no PyTorch {torch} padding (PyTorch pads both sides of an axis alike)"


def _transpose_line(kind, n, pads, strides, dilation, k_eff):
    """What ``pads`` of a ``ConvTranspose`` (of the dilated input) is in PyTorch's terms:
    ``(lo, hi) = (k_eff - 1 - p, k_eff - 1 - p + q)`` for ``padding=p, output_padding=q``."""
    p = tuple(k - 1 - lo for k, (lo, _) in zip(k_eff, pads))
    q = tuple(hi - lo for lo, hi in pads)
    torch = f"{kind}{n}d"
    if min(p) < 0 or any(not 0 <= b < max(s, d) for b, s, d in zip(q, strides, dilation)):
        return f"no PyTorch {torch} padding"
    one = lambda t: str(t[0]) if len(set(t)) == 1 else _fmt(t)           # noqa: E731
    return f"PyTorch's {torch}(padding={one(p)}, output_padding={one(q)})"


def describe(path, layer, shape, args):
    """One line for a convolution that pads ``"SAME"`` with a kernel > 1, else ``None``."""
    if padding_mode(args.get("padding")) != "SAME":
        return None
    from fnn.core import output_shape
    from fnn.layers import conv as C
    kind = layer.kind
    ksize = spatial_sizes(kind, "kernel_size", args["kernel_size"], "(3, 3)")
    n = len(ksize)
    strides = int_tuple(kind, "strides", args.get("strides", 1), n)
    dilation = int_tuple(kind, "dilation", args.get("dilation", 1), n)
    k_eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, dilation))
    if max(k_eff) == 1:
        return None                                   # SAME pads nothing at any input size
    w_shape = (*ksize, shape[-1] // args.get("groups", 1), args["features"])
    geometry = C.conv_geometry if kind == "Conv" else C.transpose_geometry
    pads = tuple(tuple(p) for p in geometry(kind, tuple(shape), w_shape, strides, "SAME",
                                            dilation, args.get("groups", 1))[3])
    torch = (_conv_line(kind, n, pads, strides, k_eff) if kind == "Conv"
             else _transpose_line(kind, n, pads, strides, dilation, k_eff))
    from fnn import layers
    zero = "VALID" if kind == "Conv" else tuple((k - 1, k - 1) for k in k_eff)   # padding=0
    zero_out = output_shape(getattr(layers, kind)(**{**args, "padding": zero}), shape)
    return (f"{kind} {path or '<root>'!r} ({layer.name}), input {tuple(shape)}: 'SAME' pads "
            f"{_fmt(tuple(_fmt(p) for p in pads))} -> {output_shape(layer, shape)}, which is "
            f"{torch}; keep it with padding={_declared(pads)}, or for PyTorch's default "
            f"padding=0 build it with padding={repr(zero) if kind == 'Conv' else _declared(zero)}"
            f" (-> {zero_out})")


def same_padded(walk) -> list[str]:
    """A line per convolution of the walk that pads ``"SAME"`` with a kernel > 1."""
    lines = (describe(*entry) for entry in walk.padded)
    return [line for line in lines if line is not None]


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside fnn (the user's call), for ``warn``."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_FNN):
        frame, level = frame.f_back, level + 1
    return level


def warn(walk, what="load_state_dict") -> None:
    """One :class:`PaddingWarning` listing every such convolution of a successful load."""
    lines = same_padded(walk)
    if not lines:
        return
    warnings.warn(PaddingWarning(
        f"{what}: {len(lines)} convolution(s) pad 'SAME' (fnn's default), which depends on the "
        f"input size; PyTorch's convolutions pad a fixed amount (default 0) and the weights fit "
        f"either way, so the state_dict cannot tell whether the outputs agree with PyTorch's. "
        f"Declare each one's padding as its PyTorch layer has it (this also silences the "
        f"warning):\n  " + "\n  ".join(lines)), stacklevel=_caller_level())
