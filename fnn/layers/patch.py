"""Images as token sequences (the Vision Transformer, Dosovitskiy et al. 2021):
``PatchEmbedding`` cuts an image into non-overlapping ``p × p`` patches and projects each to a
token; ``ClassToken`` prepends a learned token; ``SelectToken`` takes one token back out::

    serial(PatchEmbedding(16, d), ClassToken(), PositionalEmbedding(197), stack(blocks, L),
           LayerNorm(1e-6), SelectToken(0), Dense(classes))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fnn import initializers as inits
from fnn.core import Example, Layer, constructor, default_dtype, examples, from_backward, is_shape

__all__ = ["PatchEmbedding", "ClassToken", "SelectToken"]


def _pair(p):
    p = (p, p) if isinstance(p, int) else tuple(p)
    if len(p) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in p):
        raise ValueError(f"PatchEmbedding: patch_size must be a positive int or a pair of them, "
                         f"got {p!r}")
    return p


@examples(Example((2, 4, 6, 3), (2, 5)), Example((1, 6, 4, 2), ((3, 2), 4), {"use_bias": False}))
@constructor
def PatchEmbedding(patch_size, features: int, *, use_bias: bool = True, w_init=None) -> Layer:
    """Patch embedding ``[batch, H, W, C] → [batch, (H/p)(W/p), features]``: each ``p × p``
    patch (row-major over the patch grid) times a kernel, plus a bias — the convolution
    ``Conv(features, (p, p), strides=p, padding="VALID")`` flattened to tokens, computed as a
    reshape and one matrix product (torchvision ``VisionTransformer.conv_proj`` / HF ViT
    ``patch_embeddings.projection`` followed by ``flatten(2).transpose(1, 2)``).

    **Params:** ``{"w": (p, p, C, features), "b": (features,)}`` — :func:`Conv`'s layout, so
    ``w = torch_weight.permute(2, 3, 1, 0)``; He-normal kernel (``fan_in = p·p·C``), zero bias.
    ``H`` and ``W`` must be multiples of the patch size. Backward: ``dW = patchesᵀ dy``,
    ``db = Σ dy``, ``dx`` = ``dy Wᵀ`` put back in place.
    """
    ph, pw = _pair(patch_size)
    if not isinstance(features, int) or isinstance(features, bool) or features < 1:
        raise ValueError(f"PatchEmbedding: features must be a positive int, got {features!r}")
    w_init = w_init or inits.he_normal()
    name = f"PatchEmbedding({ph}x{pw}, {features})"

    def grid(shape):
        if not is_shape(tuple(shape)) or len(shape) != 4 or shape[1] % ph or shape[2] % pw:
            raise ValueError(f"{name}: expected images of shape (batch, H, W, C) with H a multiple "
                             f"of {ph} and W of {pw}, got {tuple(shape)}")
        return shape[1] // ph, shape[2] // pw

    def patches(x):                     # (B, H, W, C) -> (B, nh·nw, ph·pw·C)
        nh, nw = grid(x.shape)
        b, c = x.shape[0], x.shape[3]
        return x.reshape(b, nh, ph, nw, pw, c).transpose(0, 1, 3, 2, 4, 5) \
            .reshape(b, nh * nw, ph * pw * c)

    def unpatch(p, shape):              # the inverse of patches
        (nh, nw), (b, c) = grid(shape), (shape[0], shape[3])
        return p.reshape(b, nh, nw, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(shape)

    def init(key, input_shape):
        nh, nw = grid(input_shape)
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (ph, pw, input_shape[3], features), default_dtype())}
        if use_bias:
            params["b"] = inits.zeros(kb, (features,), default_dtype())
        return params, {}, (input_shape[0], nh * nw, features)

    def kernel(params, x):
        w = params["w"]
        if w.shape[:3] != (ph, pw, x.shape[-1]) or ("b" in params) != use_bias:
            raise ValueError(f"{name}: params w {w.shape} (bias {'b' in params}) do not fit "
                             f"images with {x.shape[-1]} channels (use_bias={use_bias})")
        return w.reshape(-1, features)

    def apply(params, state, x, *, key=None, train=False):
        y = patches(x) @ kernel(params, x)
        return (y + params["b"][None, None] if use_bias else y), state

    def backward(params, state, x, dy, *, key=None, train=False):
        w2, p = kernel(params, x), patches(x)
        dw = jnp.einsum("bnk,bnf->kf", p, dy).reshape(params["w"].shape)
        grads = {"w": dw, "b": jnp.sum(dy, axis=(0, 1))} if use_bias else {"w": dw}
        return grads, unpatch(dy @ w2.T, x.shape)

    return from_backward(init, apply, backward, name=name)


def _check_seq(name, x, features=None):
    if not hasattr(x, "ndim") or x.ndim != 3 or (features is not None and x.shape[2] != features):
        raise ValueError(f"{name}: expected input of shape (batch, tokens, {features or 'features'}),"
                         f" got {getattr(x, 'shape', type(x).__name__)}")


@examples(Example((2, 3, 4)), Example((1, 1, 2), (), {"w_init": inits.normal(0.02)}))
@constructor
def ClassToken(*, w_init=inits.zeros) -> Layer:
    """Prepend a learned token: ``[batch, N, F] → [batch, N + 1, F]`` with ``y[:, 0] = token``
    (ViT's ``[class]`` token; torchvision ``class_token``, HF ``cls_token``, both ``(1, 1, F)``:
    ``token = cls_token.reshape(-1)``). **Params:** ``{"token": (F,)}``, zeros by default (as
    torchvision). Backward: ``dtoken = Σ_b dy[b, 0]``, ``dx = dy[:, 1:]``.
    """
    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 3:
            raise ValueError(f"ClassToken: expected input shape (batch, tokens, features), got "
                             f"{input_shape}")
        b, n, f = input_shape
        return {"token": w_init(key, (f,), default_dtype())}, {}, (b, n + 1, f)

    def apply(params, state, x, *, key=None, train=False):
        _check_seq("ClassToken", x, params["token"].shape[0])
        tok = jnp.broadcast_to(params["token"].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
        return jnp.concatenate([tok, x], axis=1), state

    def backward(params, state, x, dy, *, key=None, train=False):
        _check_seq("ClassToken", x, params["token"].shape[0])
        return {"token": jnp.sum(dy[:, 0], axis=0)}, dy[:, 1:]

    return from_backward(init, apply, backward, name="ClassToken")


@examples(Example((2, 3, 4)), Example((2, 5, 3), (-1,)))
@constructor
def SelectToken(index: int = 0) -> Layer:
    """One token of a sequence: ``[batch, N, F] → [batch, F]``, ``y = x[:, index]`` (ViT's
    class-token readout, BERT's pooler input). Backward: ``dx[:, index] = dy``, zero elsewhere.
    """
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"SelectToken: index must be an int, got {index!r}")
    name = f"SelectToken({index})"

    def check(shape):
        if not is_shape(tuple(shape)) or len(shape) != 3 or not -shape[1] <= index < shape[1]:
            raise ValueError(f"{name}: expected input of shape (batch, tokens > {index}, "
                             f"features), got {tuple(shape)}")

    def init(key, input_shape):
        check(input_shape)
        return {}, {}, (input_shape[0], input_shape[2])

    def apply(params, state, x, *, key=None, train=False):
        check(x.shape)
        return x[:, index], state

    def backward(params, state, x, dy, *, key=None, train=False):
        check(x.shape)
        return {}, jnp.zeros_like(x).at[:, index].set(dy)

    return from_backward(init, apply, backward, name=name)
