"""Attention's block-size choice point (``chunk_size="auto"`` of
:func:`fnn.layers.attention.dot_product_attention` and of the layers that pass ``chunk_size``
on: ``MultiHeadAttention``, ``TransformerBlock``, ``GPT``, ...): measured on CPU by
:mod:`fnn.tuning`.

Candidates, side by side (all exact; the same maths in another order of summation):

- ``None`` (the default): the whole score matrix at once (per causal query span);
- ``128``, ``256``, ``64``, ``512`` (:data:`BLOCKS`, those below both the query and the key
  length, in the order they are measured): the chunked online-softmax form in blocks of that
  many queries and keys (``fnn/layers/_chunked_attention.py``): memory linear in the length,
  fewer bytes moved per block, a loop instead of one big product.

Each is timed as the op's hand forward and backward (``dot_product_attention_fwd`` then
``_bwd``) at the shapes at hand: batch, heads, kv heads, lengths, head dims, dtypes, ``causal``,
the query offset and the mask's and bias's shapes (random values of those shapes). ``"auto"`` is
``None`` with the tuner off or off the CPU (:func:`fnn.tuning.enabled`), with dropout (the
forms draw their dropout masks per block, so the caller's key would give each form a different
result) and with a traced query offset (decoding).

The answer is taken on the host at trace time, like ``stack.form``'s: a program exported for
another platform from this host carries this host's choice (exact either way).
"""
from __future__ import annotations

import numpy as np

from fnn import tuning

__all__ = ["BLOCKS", "chunk_size_choice", "resolve_chunk_size", "check_chunk_size"]

#: The block sizes ``"auto"`` chooses between (besides ``None``), kept where they are below both
#: the query and the key length (so a chunk is never the whole sequence), in the order they are
#: measured: the likeliest winners first, so that a measurement cut short by the time budget
#: (``FNN_TUNE_BUDGET``, on a busy machine) has timed those (benchmarks/RESULTS.md).
BLOCKS = (128, 256, 64, 512)


def check_chunk_size(chunk_size, where: str = "dot_product_attention") -> None:
    """``chunk_size``: ``None``, a positive int or ``"auto"``, else ``ValueError``."""
    if chunk_size is None or isinstance(chunk_size, str) and chunk_size == "auto":
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be a positive int, None or 'auto', got "
                         f"{chunk_size!r}")


def _name(c):
    return f"chunk_size={c}"


def chunk_size_choice(q_shape, k_shape, v_shape, dtypes, *, causal=False, mask_shape=None,
                      bias=None, q_offset=0):
    """Choice point (:mod:`fnn.tuning`): the fastest ``chunk_size`` (``None`` or one of
    :data:`BLOCKS`) of attention at these shapes; ``None`` with the tuner off. ``dtypes``: of
    ``q, k, v``; ``mask_shape``: the boolean mask's shape or ``None``; ``bias``: ``(shape,
    dtype)`` of the additive bias or ``None``; ``q_offset``: a static int."""
    blocks = [c for c in BLOCKS if c < min(q_shape[1], k_shape[1])]
    if not tuning.enabled() or not blocks:
        return None
    from fnn.layers import attention as A
    kw = dict(causal=bool(causal), q_offset=int(q_offset))

    def candidate(c):
        def run(q, k, v, dout, mask, bias):
            out, res = A.dot_product_attention_fwd(q, k, v, mask, bias=bias, chunk_size=c, **kw)
            return out, A.dot_product_attention_bwd(res, dout, mask, bias=bias, chunk_size=c,
                                                     **kw)
        return tuning.Candidate(_name(c), run)

    def make_args():
        import jax
        r = np.random.default_rng(0)
        q, k, v = (r.standard_normal(s).astype(t) for s, t in zip((q_shape, k_shape, v_shape),
                                                                  dtypes))
        mask = None if mask_shape is None else r.random(mask_shape) < 0.9
        b = None if bias is None else r.standard_normal(bias[0]).astype(bias[1])
        out = jax.eval_shape(lambda q, k, v: A.dot_product_attention(q, k, v, causal=causal),
                             q, k, v)
        return q, k, v, r.standard_normal(out.shape).astype(out.dtype), mask, b

    key = {"q": list(q_shape), "k": list(k_shape), "v": list(v_shape),
           "dtypes": [str(np.dtype(t)) for t in dtypes], "causal": kw["causal"],
           "mask": None if mask_shape is None else list(mask_shape),
           "bias": None if bias is None else [list(bias[0]), str(np.dtype(bias[1]))],
           "q_offset": kw["q_offset"]}
    names = {_name(c): c for c in (None, *blocks)}
    won = tuning.choose("attention.chunk_size", key, [candidate(c) for c in names.values()],
                        make_args)
    return names[won]


def resolve_chunk_size(chunk_size, q, k, v, mask=None, bias=None, *, causal=False, q_offset=0,
                       dropout_rate=0.0):
    """``chunk_size`` itself, or for ``"auto"`` :func:`chunk_size_choice` at the shapes of these
    arrays (``None`` with dropout or a traced ``q_offset``: see the module docstring)."""
    if not (isinstance(chunk_size, str) and chunk_size == "auto"):
        return chunk_size
    if dropout_rate or not isinstance(q_offset, (int, np.integer)):
        return None
    return chunk_size_choice(
        tuple(q.shape), tuple(k.shape), tuple(v.shape), (q.dtype, k.dtype, v.dtype),
        causal=causal, mask_shape=None if mask is None else tuple(np.shape(mask)),
        bias=None if bias is None else (tuple(np.shape(bias)), bias.dtype), q_offset=q_offset)
