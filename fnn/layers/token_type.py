"""``TokenTypeEmbedding``: a learned vector per token type (segment) added to the token features,
BERT's ``token_type_embeddings`` (Devlin et al. 2019: sentence A / sentence B)::

    y[b, t] = x[b, t] + w[s[b, t]]            s = token_type_ids (default all 0)

Backward: ``dx = dy``; ``dw[k] = Σ_{(b, t): s[b, t] = k} dy[b, t]`` (a scatter-add over types).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fnn import initializers as inits
from fnn.checks import check_range
from fnn.core import Example, Layer, constructor, default_dtype, examples, from_backward, is_shape

__all__ = ["TokenTypeEmbedding"]


def _types_example(key, input_shape):
    b, t = input_shape[:2]
    return {"token_type_ids": jax.random.randint(key, (b, t), 0, 3)}


@examples(Example((2, 5, 4), (3,), call_kwargs=_types_example), Example((3, 2, 6), (2,)))
@constructor
def TokenTypeEmbedding(type_vocab_size: int, *, w_init=None) -> Layer:
    """Adds a learned vector per token type: ``y[b, t] = x[b, t] + w[token_type_ids[b, t]]``
    (BERT's segment embeddings, Hugging Face ``BertEmbeddings.token_type_embeddings``, whose
    ``weight`` is ``w`` as it is).

    **Keyword:** ``token_type_ids``: integer ``[batch, time]`` in ``[0, type_vocab_size)``;
    default all 0 (as Hugging Face when none is given). **Params:** ``{"w": (type_vocab_size,
    features)}``, default ``N(0, 0.02²)`` (BERT's ``initializer_range``).
    ``[batch, time, features]`` → same. Backward: ``dx = dy``, ``dw[k] = Σ dy[b, t]`` over the
    positions of type ``k``.

    >>> import jax, jax.numpy as jnp
    >>> layer = TokenTypeEmbedding(2)
    >>> params, state, _ = layer.init(jax.random.PRNGKey(0), (1, 3, 4))
    >>> y, _ = layer.apply(params, state, jnp.zeros((1, 3, 4)),
    ...                    token_type_ids=jnp.array([[0, 0, 1]]))
    >>> bool((y[0, 2] == params["w"][1]).all())
    True
    """
    if not isinstance(type_vocab_size, int) or isinstance(type_vocab_size, bool) \
            or type_vocab_size < 1:
        raise ValueError(f"TokenTypeEmbedding: type_vocab_size must be a positive int, got "
                         f"{type_vocab_size!r}")
    name = f"TokenTypeEmbedding({type_vocab_size})"
    w_init = w_init or inits.normal(0.02)

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 3:
            raise ValueError(f"{name}: expected input shape (batch, time, features), got "
                             f"{input_shape}")
        return ({"w": w_init(key, (type_vocab_size, input_shape[2]), default_dtype())}, {},
                tuple(input_shape))

    def types(params, x, token_type_ids):
        w = params["w"]
        if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[2] != w.shape[1] \
                or w.shape[0] != type_vocab_size:
            raise ValueError(f"{name}: expected input of shape (batch, time, {w.shape[1]}) and "
                             f"params w ({type_vocab_size}, features), got input "
                             f"{getattr(x, 'shape', type(x).__name__)} and w {w.shape}")
        if token_type_ids is None:
            return None
        s = token_type_ids
        if not hasattr(s, "dtype") or not jnp.issubdtype(s.dtype, jnp.integer) \
                or tuple(s.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name}: token_type_ids must be integers of shape (batch, time) = "
                             f"{tuple(x.shape[:2])}, got {getattr(s, 'dtype', type(s).__name__)} "
                             f"{tuple(getattr(s, 'shape', ()))}")
        check_range(s, 0, type_vocab_size, name, "token type id", " (type_vocab_size)")
        return s

    def apply(params, state, x, *, key=None, train=False, token_type_ids=None):
        s, w = types(params, x, token_type_ids), params["w"]
        rows = w[0][None, None] if s is None else jnp.take(w, s, axis=0)
        return x + rows.astype(x.dtype), state

    def backward(params, state, x, dy, *, key=None, train=False, token_type_ids=None):
        s, w = types(params, x, token_type_ids), params["w"]
        if s is None:
            dw = jnp.zeros_like(w).at[0].set(jnp.sum(dy, axis=(0, 1)))
        else:
            dw = jnp.zeros_like(w).at[s.reshape(-1)].add(dy.reshape(-1, w.shape[1]))
        return {"w": dw.astype(w.dtype)}, dy

    return from_backward(init, apply, backward, name=name, keywords={"token_type_ids"})
