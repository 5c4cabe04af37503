"""A hub model module for tests/test_hub*.py: GPT-2 with no blocks (``GPT2Config(n_layer=0)``:
``logits = ln_f(wte[ids] + wpe[:T]) wteᵀ``), named as ``GPT2LMHeadModel`` names it, the head
tied to the embedding."""
from fnn import layers as L
from fnn import serial, tied
from fnn.core import constructor

HF_PREFIX = "transformer"
NAMES = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f",
         "head": "lm_head"}


@constructor
def TinyLM(vocab_size: int = 11, n_embd: int = 4, n_positions: int = 6,
           layer_norm_epsilon: float = 1e-5):
    body = serial(("wte", L.Embedding(vocab_size, n_embd)),
                  ("wpe", L.PositionalEmbedding(n_positions)),
                  ("ln_f", L.LayerNorm(layer_norm_epsilon)),
                  ("head", L.Dense(vocab_size, use_bias=False)))
    model = tied(body, "head/w", "wte/w", transpose=True)
    config = {"vocab_size": vocab_size, "n_embd": n_embd, "n_positions": n_positions,
              "layer_norm_epsilon": layer_norm_epsilon}
    return model._replace(meta={**model.meta, "torch_names": NAMES, "hf": config})


def from_hf_config(config):
    if config.get("n_layer", 0) != 0:
        raise ValueError(f"TinyLM: n_layer must be 0, got {config['n_layer']!r}")
    return TinyLM(**{k: config[k] for k in ("vocab_size", "n_embd", "n_positions",
                                            "layer_norm_epsilon")})


def hf_config(model):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 0,
            "n_head": 1, "tie_word_embeddings": True, "activation_function": "gelu_new",
            **model.meta["hf"]}


def hf_input_shape(config):
    return (1, config["n_positions"])
