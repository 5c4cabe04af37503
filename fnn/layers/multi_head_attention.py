"""``MultiHeadAttention``: projections, rotary positions and the attention op of
``fnn/layers/attention.py``, as a layer with residuals; and the KV cache for decoding.

Forward (self-attention, ``x: [b, T, F]``; cross-attention takes ``(x, context)``)::

    q, k, v = rope(x W_q + b_q), rope(c W_k + b_k), c W_v + b_v       (split into heads)
    A = attention(q, k, v),   y = A W_o + b_o

``fwd`` keeps ``x`` (and ``context``) and the attention op's residuals (``q, k, v``, ``A`` and
each row's log-sum-exp) so ``bwd`` runs::

    dW_o = Aᵀ dy,   dA = dy W_oᵀ,   (dq, dk, dv) = attention_bwd(dA),
    dq, dk = ropeᵀ(dq), ropeᵀ(dk),   dW_q = xᵀ dq, ...,   dx = dq W_qᵀ + (dk W_kᵀ + dv W_vᵀ)

The layer is written as module-level pieces over a :class:`Config` (the constructor's
arguments), each with its backward beside it: :func:`project` / :func:`project_backward` (the
q, k, v projections and rope), :func:`attend` / :func:`attend_backward` (the attention op),
:func:`output` / :func:`output_backward` (the output projection) and the cache helpers
:func:`open_cache` / :func:`append_to_cache`. :func:`forward` chains them once; ``apply``,
``fwd`` and decoding all call it, and :func:`backward` chains the backward pieces.

**Decoding.** Layers with positions take the keyword ``cache_len=L``: ``state`` is then the
explicit cache (``{}`` starts an empty one of capacity ``L``), the input holds the next positions,
and ``apply`` returns ``(y, new_cache)``. Composed with ``serial``/``residual``/``stack`` the whole
model's cache is its state pytree. :func:`init_cache` and :func:`decode_step` wrap this for any
such model, the GPT included, with one signature.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fnn import initializers as inits
from fnn.core import Example, Layer, constructor, default_dtype, examples, is_shape
from fnn.layers import _flash_attention as flash
from fnn.layers._attention_tuning import check_chunk_size, resolve_chunk_size
from fnn.layers.attention import dot_product_attention_bwd, dot_product_attention_fwd
from fnn.layers.dense import dense, dense_backward
from fnn.layers.positional import check_room, rope as rope_op, rope_backward

__all__ = ["MultiHeadAttention", "init_cache", "decode_step"]


def _mask_example(key, input_shape):
    b, t = input_shape[:2]
    mask = jax.random.bernoulli(key, 0.7, (b, 1, t, t))
    return {"mask": mask.at[0, 0, 1, :].set(False)}                         # one empty row


# use_bias=False in the sweep: the key bias's gradient is exactly zero in exact arithmetic
# (softmax ignores a constant added to a row), so vjp and backward agree only to roundoff, which
# the sweep's relative test cannot tell from an error; tests/test_multi_head_attention.py checks
# use_bias=True and the chunked form (slow to run eagerly here).
@examples(Example((2, 5, 8), (2,), {"use_bias": False}),
          Example((2, 6, 8), (4,), {"num_kv_heads": 2, "causal": True, "rope": True,
                                    "dropout": 0.25, "use_bias": False},
                  call_kwargs=_mask_example),
          Example(((2, 4, 6), (2, 5, 3)), (2,), {"head_dim": 3, "out_features": 5,
                                                 "use_bias": False}))
@constructor
def MultiHeadAttention(num_heads: int, head_dim: int | None = None,
                       num_kv_heads: int | None = None, out_features: int | None = None,
                       dropout: float = 0.0, use_bias: bool = True, *, causal: bool = False,
                       rope: bool = False, rope_base: float = 10000.0,
                       chunk_size: int | str | None = None, w_init=None) -> Layer:
    """Multi-head attention ``y = concat_h(softmax(q_h k_hᵀ/√d) v_h) W_o + b_o`` (Vaswani et al.).

    **Input:** ``x: [batch, T, F]`` (self-attention) or a pair ``(x, context: [batch, S, Fc])``
    (cross-attention; ``backward`` then returns ``(dx, dcontext)``). **Output:** ``[batch, T,
    out_features or F]``. Keywords: ``mask`` (boolean, broadcastable to ``(batch, heads, T, S)``),
    ``cache_len`` (decoding, causal self-attention only; see the module docstring).
    ``head_dim`` defaults to ``F / num_heads``; ``num_kv_heads`` (default ``num_heads``) gives
    grouped-query attention; ``rope`` rotates q and k by their positions (cache offset included);
    ``dropout`` drops attention probabilities when ``train=True`` (needs a ``key``, as PyTorch);
    ``chunk_size`` selects the memory-efficient form (on TPU/GPU the op runs as Pallas flash
    kernels instead, see ``fnn.kernels.flash_attention_mode``); ``"auto"``: the tuner's block
    size for the shapes at hand (``None`` with the tuner off; :mod:`fnn.tuning`). ``fwd`` keeps the input(s) and the
    attention op's residuals (``q, k, v``, the heads' output and each row's log-sum-exp);
    ``bwd`` starts from them, so the forward runs once.
    **Params:** ``{"q", "k", "v", "o"}``, each ``{"w": (in, out), "b": (out,)}``: ``q.w: (F, heads·d)``,
    ``k.w, v.w: (Fc, kv_heads·d)``, ``o.w: (heads·d, out)``; Glorot-uniform kernels, zero biases.
    From ``torch.nn.MultiheadAttention`` (``E`` = embed_dim, same head split):
    ``q.w = in_proj_weight[:E].T``, ``k.w = in_proj_weight[E:2E].T``, ``v.w = in_proj_weight[2E:].T``,
    biases the matching slices of ``in_proj_bias``, ``o.w = out_proj.weight.T``, ``o.b = out_proj.bias``.
    """
    kv = num_kv_heads or num_heads
    for what, n in (("num_heads", num_heads), ("num_kv_heads", kv)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"MultiHeadAttention: {what} must be a positive int, got {n!r}")
    if num_heads % kv:
        raise ValueError(f"MultiHeadAttention: num_heads {num_heads} must be a multiple of "
                         f"num_kv_heads {kv}")
    if not 0 <= dropout < 1:
        raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1), got {dropout!r}")
    check_chunk_size(chunk_size, "MultiHeadAttention")
    name = f"MultiHeadAttention({num_heads})"
    cfg = Config(name, num_heads, kv, head_dim, out_features, dropout, use_bias, causal, rope,
                 rope_base, chunk_size, w_init or inits.glorot_uniform())

    def init(key, input_shape):
        return init_params(cfg, key, input_shape)

    def apply(params, state, x, *, key=None, train=False, mask=None, cache_len=None):
        y, _, cache = forward(cfg, params, x, mask, key=key, train=train, cache=state,
                              cache_len=cache_len)
        return y, (state if cache_len is None else cache)

    def fwd(params, state, x, *, key=None, train=False, mask=None, cache_len=None):
        if cache_len is not None:
            raise ValueError(f"{name}: fwd/backward does not run in decoding mode "
                             f"(cache_len given)")
        y, res, _ = forward(cfg, params, x, mask, key=key, train=train)
        return y, state, res

    def bwd(params, state, res, dy, *, key=None, train=False, mask=None, cache_len=None):
        return backward(cfg, params, res, dy, mask, key=key, train=train)

    return Layer(init, apply, fwd, bwd, name, keywords={"mask", "cache_len"},
                 stochastic=dropout > 0)


class Config(NamedTuple):
    """What the pieces of one :func:`MultiHeadAttention` need: its constructor's arguments
    (``kv_heads`` resolved, ``w_init`` defaulted) and its display ``name`` for errors."""
    name: str
    num_heads: int
    kv_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    dropout: float = 0.0
    use_bias: bool = True
    causal: bool = False
    rope: bool = False
    rope_base: float = 10000.0
    chunk_size: int | str | None = None
    w_init: Callable | None = None


# --------------------------------------------------------------------------- shapes, params

def input_shapes(cfg: Config, shape):
    """Check an input shape (``(b, T, F)`` or a pair ``((b, T, F), (b, S, Fc))``); return
    ``(x_shape, context_shape, cross, head_dim)``."""
    cross = not is_shape(shape)
    xs, cs = (shape if cross and len(shape) == 2 else (shape, shape))
    if not (is_shape(xs) and is_shape(cs) and len(xs) == 3 and len(cs) == 3
            and xs[0] == cs[0]):
        raise ValueError(f"{cfg.name}: expected input shape (batch, time, features) or a pair "
                         f"((batch, T, F), (batch, S, Fc)), got {shape}")
    d = cfg.head_dim or xs[2] // cfg.num_heads
    if cfg.head_dim is None and xs[2] % cfg.num_heads:
        raise ValueError(f"{cfg.name}: features {xs[2]} not divisible by num_heads "
                         f"{cfg.num_heads}; pass head_dim")
    if cfg.rope and d % 2:
        raise ValueError(f"{cfg.name}: rope needs an even head_dim, got {d}")
    return tuple(xs), tuple(cs), cross, d


def init_params(cfg: Config, key, input_shape):
    """The layer's ``init``: ``(params, {}, output_shape)``."""
    xs, cs, _, d = input_shapes(cfg, input_shape)
    fo = cfg.out_features or xs[2]
    ks = jax.random.split(key, 4)
    sizes = {"q": (xs[2], cfg.num_heads * d), "k": (cs[2], cfg.kv_heads * d),
             "v": (cs[2], cfg.kv_heads * d), "o": (cfg.num_heads * d, fo)}
    params = {n: {"w": cfg.w_init(k, s, default_dtype())} for k, (n, s) in zip(ks, sizes.items())}
    if cfg.use_bias:
        for n, s in sizes.items():
            params[n]["b"] = jnp.zeros((s[1],), default_dtype())
    return params, {}, xs[:2] + (fo,)


def split_input(cfg: Config, params, x):
    """``(x, context, cross)`` of an input ``x`` or pair ``(x, context)``, checked against
    ``params`` (self-attention: ``context`` is ``x``)."""
    cross = isinstance(x, (tuple, list))
    xq, ctx = (x if cross and len(x) == 2 else (x, x))
    input_shapes(cfg, (tuple(getattr(xq, "shape", ())), tuple(getattr(ctx, "shape", ()))))
    if xq.shape[2] != params["q"]["w"].shape[0] or ctx.shape[2] != params["k"]["w"].shape[0]:
        raise ValueError(f"{cfg.name}: input features {xq.shape[2]}/{ctx.shape[2]} do not match "
                         f"params q.w {params['q']['w'].shape}, k.w {params['k']['w'].shape}")
    return xq, ctx, cross


# --------------------------------------------------------------------------- the pieces

def project(cfg: Config, params, xq, ctx, q_pos, k_pos, fused):
    """Queries from ``xq: [b, T, F]``, keys and values from ``ctx: [b, S, Fc]``, split into heads
    and (``cfg.rope``) rotated by their positions ``q_pos: [T]``, ``k_pos: [S]``:
    ``q: [b, T, heads, d]``, ``k, v: [b, S, kv_heads, d]``. ``fused`` (self-attention, ``ctx is
    xq``): one matmul with ``[W_q | W_k | W_v]``."""
    h, kv = cfg.num_heads, cfg.kv_heads
    b, t, s, d = xq.shape[0], xq.shape[1], ctx.shape[1], params["q"]["w"].shape[1] // h
    if fused:
        w, bias = _fused(params, cfg.use_bias)
        q, k, v = jnp.split(dense(xq, w, bias), [h * d, (h + kv) * d], -1)
    else:
        q, k, v = (dense(inp, params[n]["w"], params[n].get("b"))
                   for n, inp in (("q", xq), ("k", ctx), ("v", ctx)))
    q, k, v = q.reshape(b, t, h, d), k.reshape(b, s, kv, d), v.reshape(b, s, kv, d)
    if cfg.rope:
        q, k = rope_op(q, q_pos, cfg.rope_base), rope_op(k, k_pos, cfg.rope_base)
    return q, k, v


def project_backward(cfg: Config, params, xq, ctx, dq, dk, dv, q_pos, k_pos, fused):
    """VJP of :func:`project`: ``(grads of the q, k, v params, dx, dcontext)`` from the heads'
    gradients (``dcontext`` is ``0`` when ``fused``: all of it is in ``dx``)."""
    if cfg.rope:
        dq, dk = rope_backward(dq, q_pos, cfg.rope_base), rope_backward(dk, k_pos, cfg.rope_base)
    use_bias = cfg.use_bias
    if fused:
        w, _ = _fused(params, use_bias)
        dw, db, dx = dense_backward(xq, w, jnp.concatenate(
            [_merge(dq), _merge(dk), _merge(dv)], axis=-1), use_bias)
        cuts = [dq.shape[2] * dq.shape[3], (dq.shape[2] + dk.shape[2]) * dq.shape[3]]
        dws, dbs = jnp.split(dw, cuts, 1), (jnp.split(db, cuts) if use_bias else [None] * 3)
        return {n: _pack(a, c) for n, a, c in zip("qkv", dws, dbs)}, dx, 0
    gq, gk, gv = (dense_backward(inp, params[n]["w"], _merge(g), use_bias)
                  for n, inp, g in (("q", xq, dq), ("k", ctx, dk), ("v", ctx, dv)))
    grads = {n: _pack(*g[:2]) for n, g in zip("qkv", (gq, gk, gv))}
    return grads, gq[2], gk[2] + gv[2]


def attention_options(cfg: Config, key, train):
    """Keyword arguments of the attention op for this layer: dropout only when training."""
    rate = cfg.dropout if train else 0.0
    if rate and key is None:
        raise ValueError(f"{cfg.name}: train=True needs a key for attention dropout; pass "
                         f"key=jax.random.PRNGKey(...) to apply and backward (the same key)")
    return dict(causal=cfg.causal, chunk_size=cfg.chunk_size, dropout_rate=rate, dropout_key=key)


def attend(cfg: Config, q, k, v, mask=None, *, key=None, train=False, q_offset=0):
    """The heads' output ``A: [b, T, heads, d]`` and the attention op's residuals (see
    ``dot_product_attention_fwd``); queries sit at positions ``q_offset + 0..T-1``. The flash
    kernels on TPU/GPU where they apply (``fnn/layers/_flash_attention.py``)."""
    opts = attention_options(cfg, key, train)
    if flash.usable(q, k, v, opts["dropout_rate"], q_offset):
        chunk = resolve_chunk_size(cfg.chunk_size, q, k, v, mask, causal=cfg.causal)
        return flash.attend(q, k, v, mask, causal=cfg.causal, chunk_size=chunk)
    return dot_product_attention_fwd(q, k, v, mask, q_offset=q_offset, **opts)


def attend_backward(cfg: Config, res, da, mask=None, *, key=None, train=False):
    """VJP of :func:`attend` (``q_offset = 0``) from its residuals: ``(dq, dk, dv)``."""
    if "l" in res:                                          # the flash form's residuals
        chunk = resolve_chunk_size(cfg.chunk_size, res["q"], res["k"], res["v"], mask,
                                   causal=cfg.causal)     # "auto": the forward's (memoized) choice
        return flash.attend_backward(res, da, mask, causal=cfg.causal, chunk_size=chunk)
    return dot_product_attention_bwd(res, da, mask, **attention_options(cfg, key, train))


def output(params, a):
    """The output projection ``y = concat_h(A) W_o + b_o`` of ``a: [b, T, heads, d]``."""
    return dense(_merge(a), params["o"]["w"], params["o"].get("b"))


def output_backward(cfg: Config, params, a, dy):
    """VJP of :func:`output`: ``(grads of the o params, dA = dy W_oᵀ [b, T, heads, d])``."""
    da = jnp.matmul(dy, params["o"]["w"].T).reshape(a.shape)                 # dA = dy W_oᵀ
    return _pack(*dense_backward(_merge(a), params["o"]["w"], dy, cfg.use_bias)[:2]), da


# --------------------------------------------------------------------------- the cache

def open_cache(cfg: Config, params, cache, xq, cache_len):
    """Check a decoding cache for the input ``xq: [b, t, F]`` (``{}``: a new empty one of
    capacity ``cache_len``) and that ``t`` more positions fit; return it."""
    (b, t, _), dt = xq.shape, jnp.result_type(xq, params["k"]["w"])
    d = params["q"]["w"].shape[1] // cfg.num_heads
    shape = (b, cache_len, cfg.kv_heads, d)
    if not isinstance(cache_len, int) or cache_len < 1:
        raise ValueError(f"{cfg.name}: cache_len must be a positive int, got {cache_len!r}")
    if not cache:
        cache = {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
                 "index": jnp.zeros((), jnp.int32)}
    if set(cache) != {"k", "v", "index"} or cache["k"].shape != shape:
        raise ValueError(f"{cfg.name}: expected a cache {{'k', 'v': {shape}, "
                         f"'index'}}, got {jax.tree.map(jnp.shape, cache)}")
    check_room(cfg.name, cache["index"], t, cache_len)
    return cache


def append_to_cache(cache, k, v):
    """Write ``k, v: [b, t, kv_heads, d]`` at the cache's index: ``(all keys, all values,
    new cache)`` (keys and values of the whole capacity; unwritten rows are zero)."""
    idx = cache["index"]
    kc = lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), idx, axis=1)
    vc = lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), idx, axis=1)
    return kc, vc, {"k": kc, "v": vc, "index": idx + k.shape[1]}


# --------------------------------------------------------------------------- forward, backward

def forward(cfg: Config, params, x, mask=None, *, key=None, train=False, cache=None,
            cache_len=None):
    """The layer's one forward, shared by ``apply``, ``fwd`` and decoding:
    :func:`project`, :func:`attend`, :func:`output`. Returns ``(y, residuals, cache)``.

    ``cache_len`` given: decoding (causal self-attention; no dropout): ``x`` holds the positions
    after the cache's index, keys and values are appended to ``cache`` (see :func:`open_cache`)
    and queries attend to the whole cache; the new cache is returned."""
    decoding = cache_len is not None
    if decoding and (isinstance(x, (tuple, list)) or not cfg.causal):
        raise ValueError(f"{cfg.name}: decoding (cache_len=) needs causal self-attention")
    xq, ctx, cross = split_input(cfg, params, x)
    if decoding:
        cache = open_cache(cfg, params, cache, xq, cache_len)
        offset = cache["index"]
        q_pos = k_pos = offset + jnp.arange(xq.shape[1])
        key, train = None, False
    else:
        offset, q_pos, k_pos = 0, jnp.arange(xq.shape[1]), jnp.arange(ctx.shape[1])
    q, k, v = project(cfg, params, xq, ctx, q_pos, k_pos, fused=not cross)
    if decoding:
        k, v, cache = append_to_cache(cache, k, v)
    a, att = attend(cfg, q, k, v, mask, key=key, train=train, q_offset=offset)  # (b, t, h, d)
    return output(params, a), {"x": (xq, ctx) if cross else xq, "att": att}, cache


def backward(cfg: Config, params, res, dy, mask=None, *, key=None, train=False):
    """The layer's ``bwd``: ``(grads, dx)`` from :func:`forward`'s residuals (``dx`` is the pair
    ``(dx, dcontext)`` for cross-attention): :func:`output_backward`,
    :func:`attend_backward`, :func:`project_backward`."""
    cross = isinstance(res["x"], tuple)
    xq, ctx = res["x"] if cross else (res["x"], res["x"])
    a = res["att"]["o"]                                                       # (b, t, h, d)
    want = a.shape[:2] + (params["o"]["w"].shape[1],)
    if not hasattr(dy, "shape") or dy.shape != want:
        raise ValueError(f"{cfg.name}: dy shape {getattr(dy, 'shape', dy)} differs from the "
                         f"output shape {want}")
    grads_o, da = output_backward(cfg, params, a, dy)
    dq, dk, dv = attend_backward(cfg, res["att"], da, mask, key=key, train=train)
    grads, dx, dctx = project_backward(cfg, params, xq, ctx, dq, dk, dv, jnp.arange(a.shape[1]),
                                       jnp.arange(ctx.shape[1]), fused=not cross)
    grads["o"] = grads_o
    return {n: grads[n] for n in "qkvo"}, ((dx, dctx) if cross else dx + dctx)


def _fused(params, use_bias):
    """``[W_q | W_k | W_v]`` and its bias: one projection matmul for self-attention."""
    w = jnp.concatenate([params[n]["w"] for n in "qkv"], axis=1)
    return w, (jnp.concatenate([params[n]["b"] for n in "qkv"]) if use_bias else None)


def _merge(a):
    """``(b, t, heads, d)`` → ``(b, t, heads·d)`` (explicit sizes: ``t`` may be 0)."""
    return a.reshape(a.shape[:2] + (a.shape[2] * a.shape[3],))


def _pack(dw, db):
    return {"w": dw} if db is None else {"w": dw, "b": db}


# --------------------------------------------------------------------------- decoding

def init_cache(model: Layer, params, state, x, max_len: int):
    """An empty decoding cache of capacity ``max_len`` for ``model`` — its state pytree in
    decoding form (``{"k", "v": [batch, max_len, kv_heads, d], "index"}`` per attention layer).

    ``x``: an input of the model with the right batch, feature shape and dtype (the prompt:
    token ids for a GPT, ``[batch, t, F]`` features for a layer); only ``x[:, :0]`` is used.
    Works for any model whose positional/attention layers take ``cache_len`` (``serial``,
    ``residual``, ``stack`` thread the cache as state; ``fnn.models.GPT`` too).

    >>> mha = MultiHeadAttention(2, causal=True)
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8))       # [batch, time, features]
    >>> params, state, _ = mha.init(jax.random.PRNGKey(1), x.shape)
    >>> cache = init_cache(mha, params, state, x, 8)                  # room for 8 positions
    >>> decode = jax.jit(lambda cache, x: decode_step(mha, params, cache, x, 8))
    >>> y01, cache = decode(cache, x[:, :2])                          # the prompt
    >>> y2, cache = decode(cache, x[:, 2:])                           # then one step at a time
    >>> full, _ = jax.jit(mha.apply)(params, state, x)                # one causal forward
    >>> bool(jnp.allclose(jnp.concatenate([y01, y2], axis=1), full, atol=1e-6))
    True
    """
    if isinstance(x, int):
        raise ValueError(f"init_cache: expected an input x of shape (batch, time, ...) (the "
                         f"prompt), got the int {x} (a batch size: pass the prompt instead)")
    if not hasattr(x, "shape") or len(x.shape) < 2:
        raise ValueError(f"init_cache: expected an input x of shape (batch, time, ...) (the "
                         f"prompt), got {getattr(x, 'shape', type(x).__name__)}")
    return model.apply(params, state, x[:, :0], cache_len=max_len)[1]


def decode_step(model: Layer, params, cache, x, max_len: int):
    """Feed the next positions ``x: [batch, t, ...]`` through ``model`` with ``cache``:
    ``(y, new_cache)``, equal to the matching rows of one causal forward over the whole sequence.
    Raises ``ValueError`` when the positions would run past ``max_len``."""
    return model.apply(params, cache, x, cache_len=max_len)
