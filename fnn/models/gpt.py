"""A small GPT (Radford et al. 2018/2019) assembled from fnn pieces, with KV-cache decoding.

::

    h₀ = E[tokens] + positions          (learned, sinusoidal, or none when rotary)
    h  = stack(TransformerBlock(causal, pre-norm), depth)(h₀)
    logits = Norm(h) Eᵀ                 (tied; or a separate Dense head)

Everything is a ``fnn.Layer``: ``apply`` runs the model, ``backward`` is hand-derived (the
blocks' rules run in a reverse ``lax.scan``; the tied matrix sums both gradients). Decoding:
``cache = init_cache(...)``, then ``logits, cache = decode_step(...)`` one token (or several) at a
time; :func:`sample` draws with temperature and top-k inside one compiled loop.
:func:`value_and_grad` is the hand-derived training step for next-token cross-entropy, sharing
one forward pass between the loss and the gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fnn import initializers as inits
from fnn import losses
from fnn.core import Layer, is_shape, split_key, stack
from fnn.layers.attention import init_cache as _init_cache
from fnn.layers.dense import Dense, Embedding
from fnn.layers.norm import LayerNorm, RMSNorm
from fnn.layers.positional import PositionalEmbedding, SinusoidalPositions
from fnn.layers.transformer import TransformerBlock

__all__ = ["GPT", "init_cache", "decode_step", "sample", "value_and_grad", "lm_loss"]

lm_loss = losses.softmax_cross_entropy_with_integer_labels


def GPT(vocab: int, d_model: int = 128, num_heads: int = 4, depth: int = 4,
        mlp_features: int | None = None, max_len: int = 256, *, positions: str = "learned",
        tie: bool = True, dropout: float = 0.0, norm_type: str = "layer",
        num_kv_heads: int | None = None, chunk_size: int | None = None, remat: bool = False,
        use_bias: bool = True) -> Layer:
    """A decoder-only causal language model over integer tokens.

    **Arguments:** ``vocab``; ``d_model``; ``num_heads``; ``depth`` (blocks, one ``stack``);
    ``mlp_features`` (default ``4·d_model``); ``max_len`` (learned positions' table size);
    ``positions``: ``"learned"`` (GPT-2), ``"sinusoidal"`` or ``"rope"``; ``tie``: output
    projection ``Eᵀ`` (GPT-2) instead of a separate ``Dense(vocab)``; ``dropout``,
    ``norm_type``, ``num_kv_heads``, ``chunk_size``: passed to the blocks; ``remat``: to ``stack``.
    **Params:** ``{"embed": {"w": (vocab, d)}, "pos"?, "blocks": stacked block params,
    "norm", "head"?}``. **Input:** ``[batch, time]`` ids → ``[batch, time, vocab]`` logits.
    Keywords: ``mask``, ``cache_len`` (decoding; ``state`` is then the cache).
    """
    if positions not in ("learned", "sinusoidal", "rope"):
        raise ValueError(f"GPT: positions must be 'learned', 'sinusoidal' or 'rope', "
                         f"got {positions!r}")
    parts = {"embed": Embedding(vocab, d_model, w_init=inits.normal(0.02))}
    if positions == "learned":
        parts["pos"] = PositionalEmbedding(max_len)
    elif positions == "sinusoidal":
        parts["pos"] = SinusoidalPositions()
    block = TransformerBlock(num_heads, mlp_features or 4 * d_model, dropout, "pre", True,
                             norm_type=norm_type, num_kv_heads=num_kv_heads,
                             rope=positions == "rope", chunk_size=chunk_size, use_bias=use_bias)
    parts["blocks"] = stack(block, depth, remat=remat)
    decoder = stack(block, depth)     # decoding never needs remat (and remat's checkpoint would
                                      # trace the static cache_len keyword)
    parts["norm"] = LayerNorm() if norm_type == "layer" else RMSNorm()
    if not tie:
        parts["head"] = Dense(vocab, w_init=inits.normal(0.02), use_bias=use_bias)
    names = list(parts)
    name = f"GPT(vocab={vocab}, d={d_model}, heads={num_heads}, depth={depth}, {positions})"

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 2:
            raise ValueError(f"GPT: expected token ids of shape (batch, time), got {input_shape}")
        params, state, shape = {}, {}, input_shape
        for i, n in enumerate(names):
            params[n], state[n], shape = parts[n].init(split_key(key, i), shape)
        return params, state, input_shape + (vocab,)

    def apply(params, state, x, *, key=None, train=False, **kw):
        _check_tokens(x, kw)
        new, h = {}, x
        for i, n in enumerate(names):
            l = decoder if n == "blocks" and kw.get("cache_len") is not None else parts[n]
            h, new[n] = l.apply(params[n], state[n], h, key=split_key(key, i), train=train,
                                **{k: v for k, v in kw.items() if k in l.keywords})
        return (_tied(params, h) if tie else h), new

    def backward(params, state, x, dy, *, key=None, train=False, **kw):
        _check_tokens(x, kw)
        if kw.get("cache_len") is not None:
            raise ValueError("GPT: backward does not run in decoding mode (cache_len given)")
        _, tape = _forward(parts, block, params, state, x, key, train, kw)
        return _backward(parts, block, params, state, x, tape, dy, key, train, kw)

    return Layer(init, apply, backward, name, frozenset({"mask", "cache_len"}),
                 tuple((n, parts[n]) for n in names), dropout > 0)


def _check_tokens(x, kw=None):
    unknown = set(kw or {}) - {"mask", "cache_len"}
    if unknown:
        raise TypeError(f"GPT: unexpected keyword(s) {sorted(unknown)}; it takes mask, cache_len")
    if not hasattr(x, "dtype") or x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"GPT: expected integer token ids of shape (batch, time), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")


def _tied(params, z):
    return jnp.einsum("btd,vd->btv", z, params["embed"]["w"])                   # z Eᵀ


def _scan(f, init, xs, unroll, reverse=False):
    """``lax.scan(f, init, xs)``, or the same as a Python loop (``unroll``): then XLA sees the
    blocks' forward and the forward each block's backward recomputes in one computation and
    merges them (CSE), at the price of compile time growing with depth."""
    if not unroll:
        return lax.scan(f, init, xs, reverse=reverse)
    n = jax.tree.leaves(xs)[0].shape[0]
    ys = [None] * n
    for i in (reversed(range(n)) if reverse else range(n)):
        init, ys[i] = f(init, jax.tree.map(lambda a: a[i], xs))
    return init, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _forward(parts, block, params, state, tokens, key, train, kw, unroll=False):
    """The forward pass keeping what the backward needs: each block's input."""
    names = list(parts)
    kb = split_key(key, names.index("blocks"))
    h = parts["embed"].apply(params["embed"], state["embed"], tokens)[0]
    emb = h
    if "pos" in parts:
        h = parts["pos"].apply(params["pos"], state["pos"], h)[0]
    depth = jax.tree.leaves(params["blocks"])[0].shape[0]
    keys = None if kb is None else jax.vmap(lambda i: jax.random.fold_in(kb, i))(jnp.arange(depth))
    bkw = {k: v for k, v in kw.items() if k in block.keywords}

    def body(h, xs):
        p, s, k = xs
        return block.apply(p, s, h, key=k, train=train, **bkw)[0], h
    hl, inputs = _scan(body, h, (params["blocks"], state["blocks"], keys), unroll)  # (L,b,t,d)
    z = parts["norm"].apply(params["norm"], state["norm"], hl)[0]
    logits = parts["head"].apply(params["head"], state["head"], z)[0] if "head" in parts \
        else _tied(params, z)
    return logits, (emb, inputs, keys, hl, z)


def _backward(parts, block, params, state, tokens, tape, dlogits, key, train, kw, unroll=False):
    emb, inputs, keys, hl, z = tape
    grads = {}
    if "head" in parts:
        grads["head"], dz = parts["head"].backward(params["head"], state["head"], z, dlogits)
        de_head = 0
    else:
        de_head = jnp.einsum("btv,btd->vd", dlogits, z)                          # dE += dyᵀ z
        dz = jnp.einsum("btv,vd->btd", dlogits, params["embed"]["w"])           # dz = dy E
    grads["norm"], dh = parts["norm"].backward(params["norm"], state["norm"], hl, dz)
    bkw = {k: v for k, v in kw.items() if k in block.keywords}

    def body(d, xs):
        p, s, k, h = xs
        dp, d = block.backward(p, s, h, d, key=k, train=train, **bkw)
        return d, dp
    dh, grads["blocks"] = _scan(body, dh, (params["blocks"], state["blocks"], keys, inputs),
                                unroll, reverse=True)
    if "pos" in parts:
        grads["pos"], dh = parts["pos"].backward(params["pos"], state["pos"], emb, dh)
    de, _ = parts["embed"].backward(params["embed"], state["embed"], tokens, dh)
    grads["embed"] = {"w": de["w"] + de_head}
    return {n: grads[n] for n in parts}, None


def _parts_of(model, who):
    """``(parts, block)`` of a GPT, read from its ``children``."""
    if not isinstance(model, Layer) or not model.name.startswith("GPT("):
        raise TypeError(f"{who}: expected a model built by fnn.models.GPT, got {model!r}")
    parts = dict(model.children)
    return parts, parts["blocks"].children[0][1]


def value_and_grad(model: Layer, *, unroll: bool = False):
    """Hand-derived training step for next-token cross-entropy (mean over tokens, nats):
    ``f(params, state, tokens, targets, *, key=None, train=True, **kw) -> ((loss, state), grads)``
    (the signature of ``fnn.backprop.value_and_grad``). One forward pass keeps each block's
    input; the loss's gradient ``(softmax − onehot)/N`` then runs back through the hand rules,
    each block recomputing its own forward. ``unroll=True`` loops over the blocks in Python
    instead of ``lax.scan``, so XLA merges that recomputation with the forward pass (faster
    steps, compile time growing with depth); the params stay stacked either way."""
    parts, block = _parts_of(model, "value_and_grad")

    def f(params, state, tokens, targets, *, key=None, train=True, **kw):
        _check_tokens(tokens, kw)
        logits, tape = _forward(parts, block, params, state, tokens, key, train, kw, unroll)
        loss, dlogits = lm_loss(logits, targets), lm_loss.grad(logits, targets)
        grads, _ = _backward(parts, block, params, state, tokens, tape, dlogits, key, train, kw,
                             unroll)
        return (loss, state), grads
    return f


# --------------------------------------------------------------------------- decoding

def init_cache(model: Layer, params, state, batch: int, max_len: int):
    """An empty KV cache of capacity ``max_len`` for ``batch`` sequences (the model's state in
    decoding form: per block ``{"k", "v": (depth, batch, max_len, kv_heads, d), "index"}``)."""
    return _init_cache(model, params, state, jnp.zeros((batch, 1), jnp.int32), max_len)


def decode_step(model: Layer, params, cache, tokens, max_len: int):
    """Feed ``tokens: [batch, t]`` (the next positions) with ``cache``: ``(logits [batch, t,
    vocab], new_cache)`` — equal to those rows of the full causal forward."""
    return model.apply(params, cache, tokens, cache_len=max_len)


def _pick(key, logits, temperature, top_k):
    """Next token from ``logits: [batch, vocab]``: argmax at ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][:, -1:]                                # (b, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _sampler(model, steps, max_len, temperature, top_k):
    @jax.jit
    def run(params, state, key, prompt):
        logits, cache = model.apply(params, state, prompt, cache_len=max_len)
        first = _pick(jax.random.fold_in(key, 0), logits[:, -1], temperature, top_k)

        def body(carry, i):
            tok, cache = carry
            logits, cache = model.apply(params, cache, tok[:, None], cache_len=max_len)
            nxt = _pick(jax.random.fold_in(key, i), logits[:, -1], temperature, top_k)
            return (nxt, cache), tok
        (last, _), toks = lax.scan(body, (first, cache), jnp.arange(1, steps))
        return jnp.concatenate([prompt, toks.T, last[:, None]], axis=1)
    return run


def sample(model: Layer, params, state, key, prompt, steps: int, *, temperature: float = 1.0,
           top_k: int | None = None, max_len: int | None = None):
    """Generate ``steps`` tokens after ``prompt: [batch, p]`` with the KV cache (one compiled
    loop). ``temperature=0`` is greedy; ``top_k`` keeps the ``k`` most likely tokens.
    **Returns:** ``[batch, p + steps]`` ids. ``max_len``: cache capacity (default ``p + steps``).
    """
    _check_tokens(prompt)
    p = prompt.shape[1]
    max_len = max_len or p + steps
    if p < 1 or steps < 1 or p + steps > max_len:
        raise ValueError(f"sample: need a prompt of >= 1 token and steps >= 1 with prompt + "
                         f"steps <= max_len, got prompt {p}, steps {steps}, max_len {max_len}")
    table = params.get("pos", {}).get("w") if isinstance(params.get("pos"), dict) else None
    if table is not None and p + steps > table.shape[0]:
        raise ValueError(f"sample: {p} + {steps} positions exceed the model's learned max_len "
                         f"{table.shape[0]}")
    if not temperature >= 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= params["embed"]["w"].shape[0]:
        raise ValueError(f"sample: top_k must be in [1, vocab], got {top_k}")
    return _sampler(model, steps, max_len, float(temperature), top_k)(params, state, key, prompt)
