"""A small GPT (Radford et al. 2018/2019) assembled from fnn pieces, with KV-cache decoding.

::

    h₀ = E[tokens] + positions          (learned, sinusoidal, or none when rotary)
    h  = stack(TransformerBlock(causal, pre-norm), depth)(h₀)
    logits = Norm(h) Eᵀ                 (tied; or a separate Dense head)

The model is plain composition: ``serial(embed, pos, stack(blocks), norm[, head])`` and, when
tied, the projection ``z Eᵀ`` whose backward adds ``dlogitsᵀ z`` to the embedding's gradient.
Its ``fwd``/``bwd`` are the composition's, carrying every layer's residuals, so
:func:`value_and_grad` is ``fnn.backprop.value_and_grad`` with next-token cross-entropy: one
forward, then the hand rules backward. Decoding: ``cache = init_cache(...)``, then
``logits, cache = decode_step(...)`` one token (or several) at a time (the same two functions as
for any layer, from ``fnn.layers``); :func:`sample` draws with temperature and top-k inside one
compiled loop.
"""
from __future__ import annotations

import functools


import jax
import jax.numpy as jnp
from jax import lax

from fnn import activations as acts
from fnn import backprop, losses
from fnn import initializers as inits
from fnn.combinators import serial, stack
from fnn.core import Layer, child_key, constructor, is_shape
from fnn.layers.dense import Dense, Embedding
from fnn.layers.multi_head_attention import decode_step, init_cache
from fnn.layers.norm import LayerNorm, RMSNorm
from fnn.layers.positional import PositionalEmbedding, SinusoidalPositions
from fnn.layers.transformer import TransformerBlock

__all__ = ["GPT", "init_cache", "decode_step", "sample", "generate", "value_and_grad",
           "lm_loss"]

lm_loss = losses.softmax_cross_entropy_with_integer_labels


@constructor
def GPT(vocab: int, d_model: int = 128, num_heads: int = 4, depth: int = 4,
        mlp_features: int | None = None, max_len: int = 256, *, positions: str = "learned",
        tie: bool = True, dropout: float = 0.0, norm_type: str = "layer",
        num_kv_heads: int | None = None, chunk_size: int | str | None = None, remat: bool = False,
        use_bias: bool = True, activation=acts.gelu, mlp="dense", rope_base: float = 10000.0,
        eps: float | None = None, head_dim: int | None = None, norm: str = "pre") -> Layer:
    """A decoder-only causal language model over integer tokens.

    **Arguments:** ``vocab``; ``d_model``; ``num_heads``; ``depth`` (blocks, one ``stack``);
    ``mlp_features`` (default ``4·d_model``); ``max_len`` (learned positions' table size);
    ``positions``: ``"learned"`` (GPT-2), ``"sinusoidal"`` or ``"rope"``; ``tie``: output
    projection ``Eᵀ`` (GPT-2) instead of a separate ``Dense(vocab)``; ``dropout``,
    ``norm_type``, ``num_kv_heads``, ``chunk_size``, ``use_bias``, ``activation`` (any fnn
    activation: GPT-2 uses ``gelu_tanh``), ``mlp`` (``"dense"``, ``"gated"`` for SwiGLU as
    Llama, or a layer), ``rope_base``, ``eps``, ``head_dim``, ``norm``: passed to the blocks
    (:func:`fnn.layers.TransformerBlock`); ``eps`` also to the final norm; ``norm="post"``
    (GPT-1) has no final norm. ``remat``: to ``stack``.
    **Params:** ``{"embed": {"w": (vocab, d)}, "pos"?, "blocks": stacked block params,
    "norm"?, "head"?}``. **Input:** ``[batch, time]`` ids → ``[batch, time, vocab]`` logits.
    Keywords: ``mask``, ``cache_len`` (decoding; ``state`` is then the cache).

    >>> from fnn.core import output_shape
    >>> model = GPT(96, 128, 4, depth=4)          # vocab 96, d_model 128, 4 heads, 4 blocks
    >>> output_shape(model, (16, 128))            # what model.init(key, (16, 128)) infers
    (16, 128, 96)
    """
    if positions not in ("learned", "sinusoidal", "rope"):
        raise ValueError(f"GPT: positions must be 'learned', 'sinusoidal' or 'rope', "
                         f"got {positions!r}")
    block = TransformerBlock(num_heads, mlp_features or 4 * d_model, dropout, norm, True,
                             norm_type=norm_type, eps=eps, head_dim=head_dim,
                             num_kv_heads=num_kv_heads, rope=positions == "rope",
                             rope_base=rope_base, chunk_size=chunk_size, activation=activation,
                             use_bias=use_bias, mlp=mlp)
    final = [] if norm == "post" else [("norm", _final_norm(norm_type, eps))]
    head = [] if tie else [("head", Dense(vocab, w_init=inits.normal(0.02), use_bias=use_bias))]

    def compose(blocks):
        pos = {"learned": [("pos", PositionalEmbedding(max_len))],
               "sinusoidal": [("pos", SinusoidalPositions())], "rope": []}[positions]
        return serial(("embed", Embedding(vocab, d_model, w_init=inits.normal(0.02))), *pos,
                      ("blocks", blocks), *final, *head)
    name = f"GPT(vocab={vocab}, d={d_model}, heads={num_heads}, depth={depth}, {positions})"
    model = language_model(compose(stack(block, depth, remat=remat)), tie, name, dropout > 0)
    unrolled = language_model(compose(unrolled_stack(block, depth)), tie, name, dropout > 0)
    return model._replace(meta={"unrolled": unrolled})   # for value_and_grad


def _final_norm(norm_type, eps):
    norm = LayerNorm if norm_type == "layer" else RMSNorm
    return norm() if eps is None else norm(eps)


def language_model(body: Layer, tie: bool, name: str, stochastic: bool) -> Layer:
    """``body`` (ids → features, or logits with a head) followed by the tied projection."""
    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 2:
            raise ValueError(f"GPT: expected token ids of shape (batch, time), got {input_shape}")
        params, state, shape = body.init(key, input_shape)
        vocab = params["embed"]["w"].shape[0]
        return params, state, tuple(input_shape) + (vocab,)

    def apply(params, state, x, *, key=None, train=False, **kw):
        _check_tokens(x, kw)
        h, new_state = body.apply(params, state, x, key=key, train=train, **kw)
        return (_tied(params, h) if tie else h), new_state

    def fwd(params, state, x, *, key=None, train=False, **kw):
        _check_tokens(x, kw)
        if kw.get("cache_len") is not None:
            raise ValueError("GPT: fwd/backward does not run in decoding mode (cache_len given)")
        h, new_state, res = body.fwd(params, state, x, key=key, train=train, **kw)
        if not tie:
            return h, new_state, {"body": res}
        return _tied(params, h), new_state, {"body": res, "z": h}

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw(kw)
        if not tie:
            return body.bwd(params, state, res["body"], dy, key=key, train=train, **kw)[0], None
        dz = jnp.einsum("btv,vd->btd", dy, params["embed"]["w"])                # dz = dy E
        grads, _ = body.bwd(params, state, res["body"], dz, key=key, train=train, **kw)
        de = jnp.einsum("btv,btd->vd", dy, res["z"])                            # dE += dyᵀ z
        return {**grads, "embed": {"w": grads["embed"]["w"] + de}}, None

    return Layer(init, apply, fwd, bwd, name, keywords={"mask", "cache_len"},
                 children=body.children, stochastic=stochastic)


def unrolled_stack(block: Layer, depth: int) -> Layer:
    """``stack(block, depth)`` run as a Python loop over the stacked params (same params, state,
    keys and results): XLA then sees every block at once, at the price of compile time growing
    with depth. Used by :func:`value_and_grad` with ``unroll=True``."""
    ref = stack(block, depth)
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    stacked = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)

    def fwd(params, state, x, *, key=None, train=False, **kw):
        states, res = [], []
        for i in range(depth):
            x, s, r = block.fwd(at(params, i), at(state, i), x, key=child_key(key, i),
                                    train=train, **kw)
            states.append(s), res.append(r)
        return x, stacked(states), res

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        grads = [None] * depth
        for i in reversed(range(depth)):
            grads[i], dy = block.bwd(at(params, i), at(state, i), res[i], dy,
                                         key=child_key(key, i), train=train, **kw)
        return stacked(grads), dy

    return ref._replace(fwd=fwd, bwd=bwd)


def _check_kw(kw):
    unknown = set(kw or {}) - {"mask", "cache_len"}
    if unknown:
        raise TypeError(f"GPT: unexpected keyword(s) {sorted(unknown)}; it takes mask, cache_len")


def _check_tokens(x, kw=None):
    _check_kw(kw)
    if not hasattr(x, "dtype") or x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"GPT: expected integer token ids of shape (batch, time), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")


def _tied(params, z):
    return jnp.einsum("btd,vd->btv", z, params["embed"]["w"])                   # z Eᵀ


def value_and_grad(model: Layer, *, unroll: bool = False):
    """Hand-derived training step for next-token cross-entropy (mean over tokens, nats):
    ``f(params, state, tokens, targets, *, key=None, train=True, **kw) -> ((loss, state), grads)``
    — ``fnn.backprop.value_and_grad(model, lm_loss)``: one forward keeping every layer's
    residuals, then the loss's gradient ``(softmax − onehot)/N`` back through the hand rules.
    ``unroll=True`` loops over the blocks in Python instead of ``lax.scan`` (same params,
    stacked; compile time grows with depth; see ``benchmarks/RESULTS.md`` for when it pays)."""
    if not isinstance(model, Layer) or "unrolled" not in model.meta:
        raise TypeError(f"value_and_grad: expected a model built by fnn.models.GPT (or GPT2, "
                        f"Llama), got {model!r}")
    return backprop.value_and_grad(model.meta["unrolled"] if unroll else model, lm_loss)


# --------------------------------------------------------------------------- decoding

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
def _sampler(model, steps, max_len, temperature, top_k, eos=(), pad=0):
    return _make_sampler(model, steps, max_len, temperature, top_k, eos, pad)


def _make_sampler(model, steps, max_len, temperature, top_k, eos=(), pad=0):
    """One compiled loop: the prompt through the model filling the cache, then ``steps - 1``
    single-token steps. With ``eos`` ids, a row that has emitted one emits ``pad`` after it."""
    def finish(tok, done):
        if not eos:
            return tok, done
        tok = jnp.where(done, pad, tok)
        return tok, done | jnp.isin(tok, jnp.asarray(eos, tok.dtype))

    @jax.jit
    def run(params, state, key, prompt):
        logits, cache = model.apply(params, state, prompt, cache_len=max_len)
        first = _pick(jax.random.fold_in(key, 0), logits[:, -1], temperature, top_k)
        first, done = finish(first, jnp.zeros(first.shape, bool))

        def body(carry, i):
            tok, done, cache = carry
            logits, cache = model.apply(params, cache, tok[:, None], cache_len=max_len)
            nxt = _pick(jax.random.fold_in(key, i), logits[:, -1], temperature, top_k)
            return (*finish(nxt, done), cache), tok
        (last, _, _), toks = lax.scan(body, (first, done, cache), jnp.arange(1, steps))
        return jnp.concatenate([prompt, toks.T.reshape(prompt.shape[0], steps - 1),
                                last[:, None]], axis=1)
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


def generate(model: Layer, params, prompt_ids, max_new_tokens: int, *, state=None,
             temperature: float = 0.0, top_k: int | None = None, key=None,
             eos_token_id=None, pad_token_id=None, max_len: int | None = None):
    """``max_new_tokens`` tokens after ``prompt_ids: [batch, p]`` (or ``[p]``) with the KV cache,
    the whole decode loop one compiled function (cached per model and settings): greedy by
    default, as ``transformers``' ``model.generate(do_sample=False)``; ``temperature > 0``
    samples (``top_k`` keeps the ``k`` most likely; needs ``key``). ``eos_token_id`` (an id or
    a list): a row that emits one then emits ``pad_token_id`` (default the first eos id), as
    ``transformers`` pads a finished row (it also stops once every row is done; the output here
    keeps its full length). ``state``: the model's state (default: built from ``model.init``'s
    structure; the GPTs have none). Works for :func:`GPT`, :func:`fnn.models.GPT2`,
    :func:`fnn.models.Llama` and any model taking ``cache_len``. **Returns:** ``[batch, p +
    max_new_tokens]`` int32 ids (``[p + max_new_tokens]`` for a 1-D prompt).

    >>> model = GPT(20, 16, 2, depth=1, max_len=16)
    >>> params, state, _ = model.init(jax.random.PRNGKey(0), (1, 4))
    >>> generate(model, params, jnp.array([[1, 2, 3]]), 5).shape
    (1, 8)
    """
    prompt = jnp.asarray(prompt_ids)
    flat = prompt.ndim == 1
    prompt = prompt[None] if flat else prompt
    if not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.ndim != 2:
        raise ValueError(f"generate: expected integer prompt_ids of shape (batch, p) or (p,), "
                         f"got {prompt.dtype} {tuple(jnp.shape(prompt_ids))}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got "
                         f"{max_new_tokens!r}")
    if temperature and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs key=jax.random.PRNGKey(...)")
    eos = () if eos_token_id is None else tuple(
        int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else
                         [eos_token_id]))
    pad = int(eos[0] if pad_token_id is None and eos else pad_token_id or 0)
    if state is None:
        shapes = jax.eval_shape(lambda k: model.init(k, prompt.shape)[1], jax.random.PRNGKey(0))
        state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    prompt = prompt.astype(jnp.int32)
    steps = max_new_tokens
    _check_tokens(prompt)
    p = prompt.shape[1]
    max_len = max_len or p + steps
    table = params.get("pos", {}).get("w") if isinstance(params.get("pos"), dict) else None
    if table is not None and p + steps > table.shape[0]:
        raise ValueError(f"generate: {p} + {steps} positions exceed the model's learned "
                         f"positions ({table.shape[0]})")
    if p + steps > max_len:
        raise ValueError(f"generate: prompt {p} + max_new_tokens {steps} > max_len {max_len}")
    if top_k is not None and not 1 <= top_k <= params["embed"]["w"].shape[0]:
        raise ValueError(f"generate: top_k must be in [1, vocab], got {top_k}")
    key = jax.random.PRNGKey(0) if key is None else key
    run = _sampler(model, steps, max_len, float(temperature), top_k, eos, pad)
    out = run(params, state, key, prompt)
    return out[0] if flat else out
