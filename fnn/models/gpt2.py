"""GPT-2 (Radford et al. 2019) as Hugging Face ``transformers`` builds it (``GPT2LMHeadModel``),
assembled from fnn layers, with ``GPT2Config``'s field names and PyTorch's parameter names.

::

    h₀ = drop(wte[ids] + wpe[0..T-1])                               (embd_pdrop)
    h  = h + drop(Attn(LN₁(h))),  h = h + drop(MLP(LN₂(h)))      × n_layer (pre-norm, causal)
    MLP(x) = gelu_new(x W_fc + b_fc) W_proj + b_proj                 (n_inner = 4·n_embd)
    logits = LN_f(h) wteᵀ                                            (tied head)

Hugging Face stores every projection as ``Conv1D`` (weight ``(in, out)``, fnn's own layout) and
the attention's query, key and value fused in ``c_attn`` (``(n_embd, 3·n_embd)``); the model
declares this in ``meta["torch_layout"]`` and the tied ``lm_head.weight`` in
``meta["torch_tied"]``, so ``fnn.torch_weights.load_state_dict(GPT2(...), sd, (1, 8))`` reads a
``GPT2LMHeadModel.state_dict()`` and ``fnn.models.from_pretrained`` a hub directory.
:func:`from_hf_config` / :func:`hf_config` convert ``config.json``.
"""
from __future__ import annotations

from fnn.core import Layer, constructor
from fnn.layers.norm import LayerNorm
from fnn.layers.transformer import TransformerBlock
from fnn.models import _causal_lm as lm

__all__ = ["GPT2", "from_hf_config", "hf_config", "hf_input_shape", "HF_PREFIX"]

HF_PREFIX = "transformer"   # the base GPT2Model inside GPT2LMHeadModel (transformer.h.0...)
_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
           "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop",
           "layer_norm_epsilon", "initializer_range", "scale_attn_weights",
           "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
            "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
_BLOCK_NAMES = {"attn/norm": "ln_1", "attn/mha": "attn", "mlp/norm": "ln_2",
                "mlp/mlp/fc1": "mlp.c_fc", "mlp/mlp/fc2": "mlp.c_proj"}
_BLOCK_LAYOUT = {"attn/mha": {"qkv": "c_attn", "o": "c_proj", "format": "conv1d"},
                 "mlp/mlp/fc1": "conv1d", "mlp/mlp/fc2": "conv1d"}


@constructor
def GPT2(*, vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768,
         n_layer: int = 12, n_head: int = 12, n_inner: int | None = None,
         activation_function: str = "gelu_new", resid_pdrop: float = 0.1,
         embd_pdrop: float = 0.1, attn_pdrop: float = 0.1, layer_norm_epsilon: float = 1e-5,
         initializer_range: float = 0.02, scale_attn_weights: bool = True,
         scale_attn_by_inverse_layer_idx: bool = False, reorder_and_upcast_attn: bool = False,
         add_cross_attention: bool = False, tie_word_embeddings: bool = True,
         bos_token_id: int | None = 50256, eos_token_id: int | None = 50256,
         pad_token_id: int | None = None, remat: bool = False,
         chunk_size: int | str | None = None) -> Layer:
    """GPT-2 language model: ``transformers.GPT2LMHeadModel(GPT2Config(**same keywords))``.

    **Arguments** (``GPT2Config``'s fields and defaults, GPT-2 small): ``vocab_size``,
    ``n_positions`` (learned positions), ``n_embd``, ``n_layer``, ``n_head``, ``n_inner`` (MLP
    width, default ``4·n_embd``), ``activation_function`` (``"gelu_new"``; any of
    ``fnn.models._causal_lm.ACTIVATIONS``), ``resid_pdrop``/``attn_pdrop`` (must be equal: fnn's
    block has one rate for both), ``embd_pdrop``, ``layer_norm_epsilon``, ``initializer_range``
    (std of the embeddings' normal init), ``tie_word_embeddings`` (head ``wteᵀ``; ``False``: a
    separate ``lm_head``), ``bos/eos/pad_token_id`` (kept for ``config.json`` and generation).
    ``scale_attn_weights=True``, ``scale_attn_by_inverse_layer_idx``,
    ``reorder_and_upcast_attn`` and ``add_cross_attention`` ``False`` are the only values fnn
    implements (others raise ``ValueError`` naming the field). fnn's own: ``remat``,
    ``chunk_size`` (to the ``stack`` and the attention).
    **Params:** ``{"embed": {"w"}, "pos": {"w"}, "blocks": stacked block params, "norm",
    ["head"]}`` as :func:`fnn.models.GPT`. **Input:** ``[batch, time ≤ n_positions]`` ids →
    ``[batch, time, vocab_size]`` logits; keywords ``mask``, ``cache_len`` (decoding).

    >>> from fnn.core import output_shape
    >>> model = GPT2(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    >>> output_shape(model, (1, 8))
    (1, 8, 100)
    """
    where = "GPT2"
    lm.check_ints(where, vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                  n_layer=n_layer, n_head=n_head, **({} if n_inner is None else
                                                      {"n_inner": n_inner}))
    lm.check_rate(where, resid_pdrop=resid_pdrop, embd_pdrop=embd_pdrop, attn_pdrop=attn_pdrop)
    if n_embd % n_head:
        raise ValueError(f"GPT2: n_embd {n_embd} must be a multiple of n_head {n_head}")
    if attn_pdrop != resid_pdrop:
        raise ValueError(f"GPT2: attn_pdrop={attn_pdrop} differs from resid_pdrop={resid_pdrop}; "
                         f"fnn's TransformerBlock drops both at one rate")
    for field, value, ok in (("scale_attn_weights", scale_attn_weights, True),
                             ("scale_attn_by_inverse_layer_idx",
                              scale_attn_by_inverse_layer_idx, False),
                             ("reorder_and_upcast_attn", reorder_and_upcast_attn, False),
                             ("add_cross_attention", add_cross_attention, False)):
        lm.check_choice(where, field, value, (ok,))
    lm.check_choice(where, "tie_word_embeddings", tie_word_embeddings, (True, False))
    if not layer_norm_epsilon > 0 or not initializer_range > 0:
        raise ValueError(f"GPT2: layer_norm_epsilon and initializer_range must be > 0, got "
                         f"{layer_norm_epsilon!r}, {initializer_range!r}")
    act = lm.activation(where, "activation_function", activation_function)
    block = TransformerBlock(n_head, n_inner or 4 * n_embd, resid_pdrop, "pre", True,
                             norm_type="layer", eps=layer_norm_epsilon, activation=act,
                             chunk_size=chunk_size)
    args = locals()
    config = {k: args[k] for k in _FIELDS}
    names = {"embed": "transformer.wte", "pos": "transformer.wpe", "blocks": "transformer.h",
             "norm": "transformer.ln_f", "head": "lm_head"}
    return lm.decoder(
        name=f"GPT2(vocab={vocab_size}, d={n_embd}, heads={n_head}, layers={n_layer})",
        vocab=vocab_size, d_model=n_embd, depth=n_layer, max_len=n_positions,
        block=lm.named_block(block, _BLOCK_NAMES, _BLOCK_LAYOUT), init_std=initializer_range,
        final_norm=LayerNorm(layer_norm_epsilon), tie=tie_word_embeddings,
        embed_dropout=embd_pdrop, stochastic=bool(resid_pdrop or embd_pdrop), remat=remat,
        torch_names=names, config=config,
        torch_tied={"lm_head.weight": "transformer.wte.weight"} if tie_word_embeddings else {})


def from_hf_config(config) -> Layer:
    """:func:`GPT2` from a ``config.json`` mapping (``GPT2Config.to_dict()``): its fields by
    name (``hidden_size`` & co. as aliases); fields that do not change the model (``architectures``,
    ``summary_*``, ``use_cache``, ...) are ignored, unsupported values raise ``ValueError``."""
    return GPT2(**lm.fields_of(config, "gpt2", _FIELDS, _ALIASES))


def hf_config(model: Layer) -> dict:
    """``config.json``'s fields for a :func:`GPT2` model (``model_type``, ``architectures`` and
    every field the constructor took): ``from_hf_config(hf_config(m)) == m``."""
    return lm.config_of(model, "GPT2", "gpt2", "GPT2LMHeadModel")


def hf_input_shape(config) -> tuple:
    """The ids shape ``load_state_dict`` initialises with: ``(1, min(8, n_positions))``."""
    return (1, min(8, int(config.get("n_positions", config.get("max_position_embeddings",
                                                               1024)))))
