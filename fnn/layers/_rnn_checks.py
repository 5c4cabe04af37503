"""The recurrent layers' input checks: the sequence, its lengths and an initial carry, each
refused with a message naming the layer and what was expected; and the all-zero carry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fnn.layers.cells import as_tuple

def check_sequence(name, x, features):
    """``x`` must be ``[batch, time, features]``."""
    if not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected an array input, got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != features:
        raise ValueError(f"{name}: expected a batch of sequences of shape (batch, time, "
                         f"{features}), got shape {tuple(x.shape)}")


def check_lengths(name, lengths, batch, time):
    """``(time, batch, 1)`` boolean mask of real steps, or ``None`` without ``lengths``."""
    if lengths is None:
        return None
    lengths = lengths if isinstance(lengths, jax.Array) else jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name}: lengths must be an integer array of shape (batch,) = "
                         f"({batch},), got {lengths.dtype} of shape {tuple(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer):          # values known: a concrete array
        values = np.asarray(lengths)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > time:
            raise ValueError(f"{name}: lengths must lie in [0, {time}] (the time axis), "
                             f"got values from {lo} to {hi}")
    return (jnp.arange(time)[:, None] < lengths[None, :])[:, :, None]   # (T, B, 1)


def check_carry(name, cell, carry, batch, hidden, what="initial_carry"):
    """``carry`` (``h`` or ``(h, c)``) with every part ``[batch, hidden]``, as a tuple."""
    want = "h of shape" if cell.n_carry == 1 else "(h, c), each of shape"
    parts = as_tuple(cell, carry) if (cell.n_carry == 1 or isinstance(carry, (tuple, list))) \
        else None
    if parts is None or len(parts) != cell.n_carry or not all(
            hasattr(a, "shape") and tuple(a.shape) == (batch, hidden) for a in parts):
        got = jax.tree.map(lambda a: tuple(np.shape(a)), carry)
        raise ValueError(f"{name}: {what} must be {want} (batch, hidden) = "
                         f"({batch}, {hidden}), got shapes {got}")
    return parts


def zeros_carry(cell, batch, hidden, dtype):
    """The all-zero carry tuple."""
    return tuple(jnp.zeros((batch, hidden), dtype) for _ in range(cell.n_carry))
