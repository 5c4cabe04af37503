"""The Vision Transformer (Dosovitskiy et al. 2021), torchvision's ``VisionTransformer``,
assembled from fnn layers, channels-last::

    tokens:   conv_proj (p × p patches → d) → prepend class_token → + pos_embedding → dropout
    encoder:  L pre-norm blocks (one ``stack``):
              h = x + Drop(MHA(ln_1(x)))
              y = h + Drop(W₂ Drop(GELU(W₁ ln_2(h) + b₁)) + b₂)        mlp.0, mlp.3
    head:     ln (eps 1e-6) → token 0 → [pre_logits → tanh] → head

Parameters are named as torchvision's modules: ``conv_proj``, ``class_token``,
``pos_embedding``, ``layers`` (stacked blocks ``attention/{ln_1, self_attention}``,
``mlp/{ln_2, 0, 3}``), ``ln``, ``pre_logits``, ``head``; ``meta["torch_names"]`` and
``meta["torch_layout"]`` map them to torchvision's ``state_dict`` keys
(``encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight``, ``encoder.pos_embedding``,
``heads.head.weight``, ...) for :mod:`fnn.torch_weights`.
"""
from __future__ import annotations

from fnn import initializers as inits
from fnn.activations import Gelu, Tanh
from fnn.combinators import residual, serial, stack
from fnn.core import Layer, constructor, is_shape
from fnn.layers.dense import Dense
from fnn.layers.dropout import Dropout
from fnn.layers.multi_head_attention import MultiHeadAttention
from fnn.layers.norm import LayerNorm
from fnn.layers.patch import ClassToken, PatchEmbedding, SelectToken
from fnn.layers.positional import PositionalEmbedding

__all__ = ["VisionTransformer", "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]

EPS = 1e-6                                  # torchvision: partial(nn.LayerNorm, eps=1e-6)
_BLOCK_NAMES = {"attention": "", "mlp/ln_2": "ln_2"}
_NAMES = {"class_token": "class_token", "pos_embedding": "encoder.pos_embedding",
          "layers": "encoder.layers.encoder_layer_{i}", "ln": "encoder.ln",
          "pre_logits": "heads.pre_logits", "head": "heads.head"}
_LAYOUT = {"class_token": "parameter", "pos_embedding": "parameter"}


def _drop(name, rate):
    return [(name, Dropout(rate))] if rate else []


def _block(num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float,
           attention_dropout: float) -> Layer:
    """torchvision's ``EncoderBlock`` (pre-norm; the MLP ``Linear, GELU, Dropout, Linear,
    Dropout`` numbered as its ``MLPBlock``)."""
    attn = serial(("ln_1", LayerNorm(EPS)),
                  ("self_attention", MultiHeadAttention(num_heads, dropout=attention_dropout)),
                  *_drop("dropout", dropout))
    mlp = serial(("ln_2", LayerNorm(EPS)),
                 ("0", Dense(mlp_dim, w_init=inits.glorot_uniform())), ("1", Gelu()),
                 *_drop("2", dropout),
                 ("3", Dense(hidden_dim, w_init=inits.glorot_uniform())), *_drop("4", dropout))
    block = serial(("attention", residual(attn)), ("mlp", residual(mlp)))
    return block._replace(name="EncoderBlock", meta={"torch_names": _BLOCK_NAMES},
                          spec=block.spec)


def _positive(**ints):
    for arg, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"VisionTransformer: {arg} must be a positive int, got {v!r}")


@constructor
def VisionTransformer(image_size: int, patch_size: int, num_layers: int, num_heads: int,
                      hidden_dim: int, mlp_dim: int, dropout: float = 0.0,
                      attention_dropout: float = 0.0, num_classes: int = 1000,
                      representation_size: int | None = None) -> Layer:
    """A ViT image classifier, torchvision's ``VisionTransformer(image_size, patch_size,
    num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout, num_classes,
    representation_size)`` with its default ``norm_layer`` (LayerNorm, eps 1e-6) and patchify
    stem (no ``conv_stem_configs``).

    **Input:** images ``[batch, image_size, image_size, C]`` (channels-last: a PyTorch batch
    ``x`` is ``x.permute(0, 2, 3, 1)``; torchvision's stem takes ``C = 3``) → ``[batch,
    num_classes]`` logits. ``dropout`` after the position embedding, the attention and in the
    MLP; ``attention_dropout`` on the attention probabilities (``train=True`` needs a ``key``).
    **Params:** see the module docstring; initialised as torchvision's (patch kernel and
    ``pre_logits`` ``N(0, 1/fan_in)``, ``pos_embedding`` ``N(0, 0.02²)``, zero
    ``class_token`` and ``head``). ``fnn.torch_weights.load_state_dict(model, vit.state_dict(),
    (1, image_size, image_size, 3))`` loads torchvision's weights.

    >>> from fnn.core import output_shape
    >>> model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
    ...                           hidden_dim=16, mlp_dim=32, num_classes=10)
    >>> output_shape(model, (4, 32, 32, 3))
    (4, 10)
    """
    _positive(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
              num_classes=num_classes, **({} if representation_size is None else
                                          {"representation_size": representation_size}))
    if image_size % patch_size:
        raise ValueError(f"VisionTransformer: image_size {image_size} must be a multiple of "
                         f"patch_size {patch_size}")
    if hidden_dim % num_heads:
        raise ValueError(f"VisionTransformer: hidden_dim {hidden_dim} must be a multiple of "
                         f"num_heads {num_heads}")
    for arg, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not 0 <= rate < 1:
            raise ValueError(f"VisionTransformer: {arg} must be in [0, 1), got {rate!r}")
    seq = (image_size // patch_size) ** 2 + 1
    block = _block(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
    pre = [] if representation_size is None else [
        ("pre_logits", Dense(representation_size, w_init=inits.lecun_normal())), ("act", Tanh())]
    body = serial(("conv_proj", PatchEmbedding(patch_size, hidden_dim,
                                               w_init=inits.lecun_normal())),
                  ("class_token", ClassToken()),
                  ("pos_embedding", PositionalEmbedding(seq, w_init=inits.normal(0.02))),
                  *_drop("dropout", dropout),
                  ("layers", stack(block, num_layers)), ("ln", LayerNorm(EPS)),
                  ("select", SelectToken(0)), *pre,
                  ("head", Dense(num_classes, w_init=inits.zeros)))
    name = (f"VisionTransformer({image_size}px/{patch_size}, layers={num_layers}, "
            f"heads={num_heads}, d={hidden_dim}, classes={num_classes})")

    def check(shape):
        if not is_shape(tuple(shape)) or len(shape) != 4 \
                or tuple(shape[1:3]) != (image_size, image_size):
            raise ValueError(f"{name}: expected images of shape (batch, {image_size}, "
                             f"{image_size}, channels) (channels-last), got {tuple(shape)}")

    def init(key, input_shape):
        check(input_shape)
        return body.init(key, input_shape)

    def apply(params, state, x, **kw):
        check(getattr(x, "shape", ()))
        return body.apply(params, state, x, **kw)

    def fwd(params, state, x, **kw):
        check(getattr(x, "shape", ()))
        return body.fwd(params, state, x, **kw)

    return Layer(init, apply, fwd, body.bwd, name, keywords=body.keywords,
                 children=body.children, stochastic=body.stochastic,
                 meta={"torch_names": _NAMES, "torch_layout": _LAYOUT})


def _preset(patch, layers, heads, d, mlp, num_classes, image_size, dropout, attention_dropout):
    return VisionTransformer(image_size, patch, layers, heads, d, mlp, dropout, attention_dropout,
                             num_classes)


def vit_b_16(num_classes: int = 1000, *, image_size: int = 224, dropout: float = 0.0,
             attention_dropout: float = 0.0) -> Layer:
    """ViT-B/16 (torchvision's ``vit_b_16``): patch 16, 12 layers, 12 heads, d 768, MLP 3072."""
    return _preset(16, 12, 12, 768, 3072, num_classes, image_size, dropout, attention_dropout)


def vit_b_32(num_classes: int = 1000, *, image_size: int = 224, dropout: float = 0.0,
             attention_dropout: float = 0.0) -> Layer:
    """ViT-B/32: patch 32, 12 layers, 12 heads, d 768, MLP 3072."""
    return _preset(32, 12, 12, 768, 3072, num_classes, image_size, dropout, attention_dropout)


def vit_l_16(num_classes: int = 1000, *, image_size: int = 224, dropout: float = 0.0,
             attention_dropout: float = 0.0) -> Layer:
    """ViT-L/16: patch 16, 24 layers, 16 heads, d 1024, MLP 4096."""
    return _preset(16, 24, 16, 1024, 4096, num_classes, image_size, dropout, attention_dropout)


def vit_l_32(num_classes: int = 1000, *, image_size: int = 224, dropout: float = 0.0,
             attention_dropout: float = 0.0) -> Layer:
    """ViT-L/32: patch 32, 24 layers, 16 heads, d 1024, MLP 4096."""
    return _preset(32, 24, 16, 1024, 4096, num_classes, image_size, dropout, attention_dropout)


def vit_h_14(num_classes: int = 1000, *, image_size: int = 224, dropout: float = 0.0,
             attention_dropout: float = 0.0) -> Layer:
    """ViT-H/14: patch 14, 32 layers, 16 heads, d 1280, MLP 5120."""
    return _preset(14, 32, 16, 1280, 5120, num_classes, image_size, dropout, attention_dropout)
