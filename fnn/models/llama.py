"""Llama (Touvron et al. 2023) as Hugging Face ``transformers`` builds it (``LlamaForCausalLM``),
assembled from fnn layers, with ``LlamaConfig``'s field names and PyTorch's parameter names.

::

    h₀ = embed_tokens[ids]
    h  = h + Attn(RMSNorm₁(h)),  h = h + MLP(RMSNorm₂(h))           × num_hidden_layers
    Attn: q, k = rope(x W_q), rope(x W_k) (half-split rotate_half, base rope_theta),
          grouped-query (num_key_value_heads), causal, y = A W_o
    MLP(x) = (silu(x W_gate) ⊙ x W_up) W_down                        (SwiGLU)
    logits = RMSNorm(h) W_lm_head                                    (or embed_tokensᵀ if tied)

``meta["torch_names"]`` and ``meta["torch_layout"]`` name the parts as ``LlamaForCausalLM``
does (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj`` ..., ``mlp.gate_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``), so
``fnn.torch_weights.load_state_dict(Llama(...), sd, (1, 8))`` reads its ``state_dict`` and
``fnn.models.from_pretrained`` a hub directory. :func:`from_hf_config` / :func:`hf_config`
convert ``config.json``.
"""
from __future__ import annotations

from fnn.core import Layer, constructor
from fnn.layers.gated_mlp import GatedMLP
from fnn.layers.norm import RMSNorm
from fnn.layers.transformer import TransformerBlock
from fnn.models import _causal_lm as lm

__all__ = ["Llama", "from_hf_config", "hf_config", "hf_input_shape", "HF_PREFIX"]

HF_PREFIX = "model"         # the base LlamaModel inside LlamaForCausalLM (model.layers.0...)
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "hidden_act",
           "max_position_embeddings", "initializer_range", "rms_norm_eps",
           "tie_word_embeddings", "rope_theta", "rope_scaling", "attention_bias",
           "attention_dropout", "mlp_bias", "head_dim", "pretraining_tp", "bos_token_id",
           "eos_token_id", "pad_token_id")
_BLOCK_NAMES = {"attn/norm": "input_layernorm", "attn/mha": "self_attn",
                "mlp/norm": "post_attention_layernorm", "mlp/mlp": "mlp"}
_BLOCK_LAYOUT = {"attn/mha": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}}


@constructor
def Llama(*, vocab_size: int = 32000, hidden_size: int = 4096, intermediate_size: int = 11008,
          num_hidden_layers: int = 32, num_attention_heads: int = 32,
          num_key_value_heads: int | None = None, hidden_act: str = "silu",
          max_position_embeddings: int = 2048, initializer_range: float = 0.02,
          rms_norm_eps: float = 1e-6, tie_word_embeddings: bool = False,
          rope_theta: float = 10000.0, rope_scaling=None, attention_bias: bool = False,
          attention_dropout: float = 0.0, mlp_bias: bool = False, head_dim: int | None = None,
          pretraining_tp: int = 1, bos_token_id: int | None = 1, eos_token_id=2,
          pad_token_id: int | None = None, remat: bool = False,
          chunk_size: int | str | None = None) -> Layer:
    """Llama language model: ``transformers.LlamaForCausalLM(LlamaConfig(**same keywords))``.

    **Arguments** (``LlamaConfig``'s fields and defaults, Llama-7B): ``vocab_size``,
    ``hidden_size``, ``intermediate_size`` (SwiGLU width), ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` (grouped-query attention; default
    ``num_attention_heads``), ``head_dim`` (default ``hidden_size / num_attention_heads``),
    ``hidden_act`` (``"silu"``), ``rms_norm_eps``, ``rope_theta`` (rotary base),
    ``max_position_embeddings`` (kept; rotary positions have no table), ``attention_bias``
    (q, k, v, o biases), ``mlp_bias``, ``tie_word_embeddings``, ``initializer_range`` (std of
    the embedding's and head's normal init), ``pretraining_tp`` (kept; it changes no result),
    ``bos/eos/pad_token_id`` (kept for ``config.json`` and generation). ``rope_scaling=None``
    and ``attention_dropout=0.0`` are the only values fnn implements (others raise
    ``ValueError`` naming the field). fnn's own: ``remat``, ``chunk_size``.
    **Params:** ``{"embed": {"w"}, "blocks": stacked block params (``attn``: ``norm``, ``mha``
    ``{q, k, v, o}``; ``mlp``: ``norm``, ``mlp`` ``{gate, up, down}``), "norm", ["head"]}``.
    **Input:** ``[batch, time]`` ids → ``[batch, time, vocab_size]`` logits; keywords ``mask``,
    ``cache_len`` (decoding).

    >>> from fnn.core import output_shape
    >>> model = Llama(vocab_size=100, hidden_size=16, intermediate_size=32,
    ...               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> output_shape(model, (1, 8))
    (1, 8, 100)
    """
    where = "Llama"
    kv = num_attention_heads if num_key_value_heads is None else num_key_value_heads
    lm.check_ints(where, vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, num_key_value_heads=kv,
                  max_position_embeddings=max_position_embeddings,
                  **({} if head_dim is None else {"head_dim": head_dim}))
    if num_attention_heads % kv:
        raise ValueError(f"Llama: num_attention_heads {num_attention_heads} must be a multiple "
                         f"of num_key_value_heads {kv}")
    if head_dim is None and hidden_size % num_attention_heads:
        raise ValueError(f"Llama: hidden_size {hidden_size} must be a multiple of "
                         f"num_attention_heads {num_attention_heads} (or give head_dim)")
    if (head_dim or hidden_size // num_attention_heads) % 2:
        raise ValueError(f"Llama: rotary positions need an even head_dim, got "
                         f"{head_dim or hidden_size // num_attention_heads}")
    lm.check_choice(where, "rope_scaling", rope_scaling, (None,))
    lm.check_choice(where, "attention_dropout", attention_dropout, (0.0, 0))
    for field in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        lm.check_choice(where, field, locals()[field], (True, False))
    if not rms_norm_eps > 0 or not initializer_range > 0 or not rope_theta > 0:
        raise ValueError(f"Llama: rms_norm_eps, initializer_range and rope_theta must be > 0, "
                         f"got {rms_norm_eps!r}, {initializer_range!r}, {rope_theta!r}")
    act = lm.activation(where, "hidden_act", hidden_act)
    mlp = GatedMLP(intermediate_size, activation=act, use_bias=mlp_bias)
    block = TransformerBlock(num_attention_heads, intermediate_size, 0.0, "pre", True,
                             norm_type="rms", eps=rms_norm_eps, head_dim=head_dim,
                             num_kv_heads=kv, rope=True, rope_base=float(rope_theta),
                             use_bias=attention_bias, mlp=mlp, chunk_size=chunk_size)
    args = locals()
    config = {k: args[k] for k in _FIELDS}
    config["num_key_value_heads"] = kv
    config["head_dim"] = head_dim or hidden_size // num_attention_heads
    names = {"embed": "model.embed_tokens", "blocks": "model.layers", "norm": "model.norm",
             "head": "lm_head"}
    return lm.decoder(
        name=f"Llama(vocab={vocab_size}, d={hidden_size}, heads={num_attention_heads}/{kv}, "
             f"layers={num_hidden_layers})",
        vocab=vocab_size, d_model=hidden_size, depth=num_hidden_layers,
        block=lm.named_block(block, _BLOCK_NAMES, _BLOCK_LAYOUT), init_std=initializer_range,
        final_norm=RMSNorm(rms_norm_eps), tie=tie_word_embeddings, remat=remat,
        torch_names=names, config=config,
        torch_tied={"lm_head.weight": "model.embed_tokens.weight"} if tie_word_embeddings
        else {})


def from_hf_config(config) -> Layer:
    """:func:`Llama` from a ``config.json`` mapping (``LlamaConfig.to_dict()``, transformers 4
    or 5): its fields by name; transformers 5's ``rope_parameters`` ``{"rope_type": "default",
    "rope_theta": θ}`` is read as ``rope_theta`` (another ``rope_type`` raises ``ValueError``
    naming ``rope_parameters``). Fields that change nothing fnn computes (``architectures``,
    ``use_cache``, ...) are ignored."""
    fields = lm.fields_of(config, "llama", _FIELDS, {})
    rope = config.get("rope_parameters")
    if rope is not None:
        if not hasattr(rope, "get") or rope.get("rope_type", "default") != "default" \
                or set(rope) - {"rope_type", "rope_theta"}:
            raise ValueError(f"Llama: rope_parameters={rope!r} is not supported (fnn implements "
                             f"rope_type 'default' with rope_theta only)")
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
    return Llama(**fields)


def hf_config(model: Layer) -> dict:
    """``config.json``'s fields for a :func:`Llama` model (``model_type``, ``architectures``
    and every field the constructor took, ``head_dim`` and ``num_key_value_heads`` resolved)."""
    return lm.config_of(model, "Llama", "llama", "LlamaForCausalLM")


def hf_input_shape(config) -> tuple:
    """The ids shape ``load_state_dict`` initialises with: ``(1, 8)``."""
    return (1, 8)
