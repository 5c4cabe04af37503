"""What :func:`fnn.models.GPT2` and :func:`fnn.models.Llama` share: the decoder assembled from
fnn layers with its PyTorch names, Hugging Face activation names, argument checks and the
``config.json`` round trip.

The decoder is the composition :func:`fnn.models.GPT` uses (``serial(embed, [pos], [drop],
stack(block), norm, [head])`` followed, when tied, by the projection ``z Eᵀ``), with a block
supplied by the caller. The block is the plain ``serial`` inside a ``TransformerBlock``
(``attn``, ``mlp`` residuals) carrying its own ``meta["torch_names"]`` and ``meta["torch_layout"]``
(relative to one block), so every copy in the ``stack`` reads ``<blocks name>.{i}.<part>``.
"""
from __future__ import annotations

from fnn import activations as acts
from fnn import initializers as inits
from fnn.combinators import serial, stack
from fnn.core import Layer
from fnn.layers.dense import Dense, Embedding
from fnn.layers.dropout import Dropout
from fnn.layers.positional import PositionalEmbedding
from fnn.models.gpt import language_model, unrolled_stack

__all__ = ["ACTIVATIONS", "activation", "check_ints", "check_rate", "check_choice", "decoder",
           "named_block", "config_of", "fields_of"]

# Hugging Face ACT2FN names -> fnn activations (each with its hand-derived .vjp)
ACTIVATIONS = {"gelu_new": acts.gelu_tanh, "gelu_pytorch_tanh": acts.gelu_tanh,
               "gelu": acts.gelu, "quick_gelu": acts.quick_gelu, "silu": acts.swish,
               "swish": acts.swish, "relu": acts.relu, "tanh": acts.tanh}


def activation(where: str, field: str, name):
    """The fnn activation for a Hugging Face activation name, or ``ValueError`` naming ``field``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: {field}={name!r} is not supported; expected one of "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_ints(where: str, **fields):
    for field, v in fields.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}: {field} must be a positive int, got {v!r}")


def check_rate(where: str, **fields):
    for field, v in fields.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            raise ValueError(f"{where}: {field} must be a number in [0, 1), got {v!r}")


def check_choice(where: str, field: str, value, supported):
    """``ValueError`` naming ``field`` unless ``value`` is one of ``supported``."""
    if not any(value is s or (type(value) is type(s) and value == s) for s in supported):
        raise ValueError(f"{where}: {field}={value!r} is not supported (fnn implements "
                         f"{' or '.join(repr(s) for s in supported)})")


def named_block(block: Layer, names: dict, layout: dict) -> Layer:
    """The ``serial`` inside a ``TransformerBlock`` (params ``attn``, ``mlp``), carrying the
    PyTorch names and layouts of its parts."""
    inner = block.children[0][1]
    return inner._replace(meta={"torch_names": names, "torch_layout": layout})


def decoder(*, name: str, vocab: int, d_model: int, depth: int, block: Layer, init_std: float,
            final_norm: Layer, tie: bool, max_len: int | None = None, embed_dropout: float = 0.0,
            stochastic: bool = False, remat: bool = False, torch_names: dict,
            torch_tied: dict, config: dict) -> Layer:
    """A causal LM ``[batch, time]`` ids → ``[batch, time, vocab]`` logits: token embedding,
    learned positions when ``max_len`` is given, embedding dropout, ``depth`` copies of ``block``
    (one ``stack``), ``final_norm``, then the tied projection ``z Eᵀ`` or a ``Dense`` head
    without bias. ``meta``: ``unrolled`` (for :func:`fnn.models.value_and_grad`),
    ``torch_names``, ``torch_tied`` and ``hf_config`` (the configuration fields)."""
    normal = inits.normal(init_std)

    def compose(blocks):
        parts = [("embed", Embedding(vocab, d_model, w_init=normal))]
        if max_len is not None:
            parts.append(("pos", PositionalEmbedding(max_len, w_init=normal)))
        if embed_dropout:
            parts.append(("drop", Dropout(embed_dropout)))
        parts += [("blocks", blocks), ("norm", final_norm)]
        if not tie:
            parts.append(("head", Dense(vocab, use_bias=False, w_init=normal)))
        return language_model(serial(*parts), tie, name, stochastic)

    model = compose(stack(block, depth, remat=remat))
    return model._replace(meta={"unrolled": compose(unrolled_stack(block, depth)),
                                "torch_names": torch_names, "torch_tied": torch_tied,
                                "hf_config": dict(config)})


def config_of(model: Layer, kind: str, model_type: str, architecture: str) -> dict:
    """``config.json``'s fields for ``model`` (built by the constructor named ``kind``)."""
    if not isinstance(model, Layer) or model.kind != kind or "hf_config" not in model.meta:
        raise TypeError(f"hf_config: expected a model built by fnn.models.{kind}, got "
                        f"{getattr(model, 'name', model)!r}")
    return {"model_type": model_type, "architectures": [architecture],
            **dict(model.meta["hf_config"])}


def fields_of(config, model_type: str, fields, aliases: dict) -> dict:
    """The constructor keywords present in a ``config.json`` mapping (``aliases``: other names
    Hugging Face accepts for a field, e.g. GPT-2's ``hidden_size`` for ``n_embd``); keys that
    change nothing fnn computes (``architectures``, ``transformers_version``, ...) are ignored."""
    if not hasattr(config, "keys"):
        raise TypeError(f"from_hf_config: expected a mapping (config.json's fields), got "
                        f"{type(config).__name__}")
    got = config.get("model_type", model_type)
    if got != model_type:
        raise ValueError(f"from_hf_config: model_type must be {model_type!r}, got {got!r}")
    out = {aliases[k]: v for k, v in config.items() if k in aliases}
    out.update({k: config[k] for k in fields if k in config})
    return out
