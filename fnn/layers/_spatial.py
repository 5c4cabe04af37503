"""Argument handling shared by the spatial layers (``conv.py``, ``pooling.py``): per-axis int
tuples (kernel sizes, windows, strides, dilations) and padding (``"SAME"``, ``"VALID"`` or
explicit ``(lo, hi)`` pairs). Private: imported by those modules only.
"""
from __future__ import annotations

#: The channels-last input layout per number of spatial axes, for error messages.
LAYOUTS = {1: "(batch, width, channels)", 2: "(batch, height, width, channels)",
           3: "(batch, depth, height, width, channels)"}


def int_tuple(name, what, v, n):
    """``v`` (an int or ``n`` ints) as a tuple of ``n`` positive ints, else ``ValueError``."""
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n or not all(isinstance(a, int) and a >= 1 for a in t):
        raise ValueError(f"{name}: {what} must be a positive int or {n} positive ints, got {v!r}")
    return t


def spatial_sizes(name, what, v, example):
    """A kernel size or window: a tuple of 1 to 3 positive ints, one per spatial axis (its
    length sets the dimension); ``example`` shows one for images in the error."""
    if isinstance(v, int) or not v or len(tuple(v)) not in (1, 2, 3):
        raise ValueError(f"{name}: {what} must be a tuple with one entry per spatial axis "
                         f"(1 to 3 entries, e.g. {example} for images), got {v!r}")
    return int_tuple(name, what, v, len(tuple(v)))


def explicit_padding(name, padding, n):
    """Explicit padding: an int, or per spatial axis an int (symmetric) or a ``(lo, hi)`` pair."""
    if isinstance(padding, int):
        return ((padding, padding),) * n
    p = tuple(padding) if isinstance(padding, (tuple, list)) else ()
    pair = lambda a: isinstance(a, (tuple, list)) and len(a) == 2 and all(  # noqa: E731
        isinstance(b, int) for b in a)
    if len(p) == n and all(isinstance(a, int) or pair(a) for a in p):
        return tuple((a, a) if isinstance(a, int) else tuple(a) for a in p)
    raise ValueError(f"{name}: padding must be 'SAME', 'VALID', an int, {n} ints or {n} (lo, hi) "
                     f"pairs, got {padding!r}")


def padding_mode(padding):
    """``"SAME"``/``"VALID"``/another upper-cased string for a string ``padding``, else ``None``."""
    return padding.upper() if isinstance(padding, str) else None


def padding_pairs(name, sizes, k_eff, strides, padding):
    """``(lo, hi)`` per spatial axis of a sliding window of sizes ``k_eff``; ``SAME`` is XLA's
    (output ``ceil(n/s)``, the extra cell at the high end)."""
    mode = padding_mode(padding)
    if mode == "VALID":
        return ((0, 0),) * len(sizes)
    if mode == "SAME":
        total = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(sizes, k_eff, strides)]
        return tuple((t // 2, t - t // 2) for t in total)
    if mode is not None:
        raise ValueError(f"{name}: padding must be 'SAME', 'VALID' or explicit, got {padding!r}")
    return explicit_padding(name, padding, len(sizes))
