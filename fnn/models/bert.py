"""BERT (Devlin et al. 2019), Hugging Face ``BertModel``, assembled from fnn layers::

    embeddings:  h₀ = LayerNorm(E_word[ids] + E_pos[0..T-1] + E_type[token_type_ids]) → dropout
    encoder:     L post-norm layers (one ``stack``):
                 a = LayerNorm(h + Drop(MHA(h, mask)))         attention, attention.output
                 h = LayerNorm(a + Drop(act(a W₁ + b₁) W₂ + b₂))   intermediate, output
    pooler:      pooled = tanh(h[:, 0] W_p + b_p)
    output:      (sequence_output h [batch, T, d], pooled_output [batch, d])

The padding mask is Hugging Face's: ``attention_mask[b, s] = 0`` removes key ``s`` from every
query's softmax (HF adds ``finfo.min`` to its scores; fnn's attention gives it probability 0, the
same in floating point). A padded query row still attends to the real tokens, as in HF. One
difference: a sequence with no token at all (its mask all 0) gets attention output 0 in fnn,
where HF's all-``finfo.min`` row attends uniformly to the padding.

Parameters are named as ``BertModel``'s modules where a name is a module of fnn's:
``embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}``,
``encoder`` (the stacked layers: ``attention/mha``, ``attention_norm``, ``ffn/mlp/{fc1, fc2}``,
``output_norm``), ``pooler/dense``; ``meta["torch_names"]``/``meta["torch_layout"]`` tell
:mod:`fnn.torch_weights` the rest (``encoder.layer.{i}.attention.self.query``, ...).
Like ``nn.Embedding(padding_idx=pad_token_id)``, the pad token's word-embedding row starts at 0
and gets no gradient.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from fnn import activations as acts
from fnn import initializers as inits
from fnn.activations import Tanh
from fnn.combinators import residual, serial, stack
from fnn.core import Layer, child_key, constructor, is_shape
from fnn.layers.dense import Dense, Embedding
from fnn.layers.dropout import Dropout
from fnn.layers.multi_head_attention import MultiHeadAttention
from fnn.layers.norm import LayerNorm
from fnn.layers.patch import SelectToken
from fnn.layers.positional import PositionalEmbedding
from fnn.layers.token_type import TokenTypeEmbedding
from fnn.layers.transformer import MLP

__all__ = ["Bert", "BertForSequenceClassification", "from_hf_config", "hf_config", "hf_input_shape", "HF_PREFIX"]

HF_PREFIX = "bert"      # a BertFor... checkpoint nests BertModel's keys under "bert."

# Hugging Face ACT2FN names -> fnn activations (each with its hand derivative)
ACTIVATIONS = {"gelu": acts.gelu, "gelu_new": acts.gelu_tanh, "gelu_pytorch_tanh": acts.gelu_tanh,
               "relu": acts.relu, "silu": acts.swish, "swish": acts.swish,
               "quick_gelu": acts.quick_gelu, "tanh": acts.tanh}
FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
          "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps",
          "pad_token_id")
_LAYER_NAMES = {"attention": "", "attention/mha": "attention",
                "attention_norm": "attention.output.LayerNorm", "ffn": "",
                "ffn/mlp/fc1": "intermediate.dense", "ffn/mlp/fc2": "output.dense",
                "output_norm": "output.LayerNorm"}
_LAYER_LAYOUT = {"attention/mha": {"q": "self.query", "k": "self.key", "v": "self.value",
                                   "o": "output.dense"}}


def _drop(rate):
    return [("dropout", Dropout(rate))] if rate else []


def _check(config: dict):
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        v = config[f]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Bert: {f} must be a positive int, got {v!r}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(f"Bert: hidden_size {config['hidden_size']} must be a multiple of "
                         f"num_attention_heads {config['num_attention_heads']}")
    if config["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"Bert: hidden_act must be one of {sorted(ACTIVATIONS)}, got "
                         f"{config['hidden_act']!r}")
    for f in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if not 0 <= config[f] < 1:
            raise ValueError(f"Bert: {f} must be in [0, 1), got {config[f]!r}")
    if not config["layer_norm_eps"] > 0:
        raise ValueError(f"Bert: layer_norm_eps must be > 0, got {config['layer_norm_eps']!r}")
    pad = config["pad_token_id"]
    if pad is not None and not (isinstance(pad, int) and 0 <= pad < config["vocab_size"]):
        raise ValueError(f"Bert: pad_token_id must be None or an int in [0, vocab_size = "
                         f"{config['vocab_size']}), got {pad!r}")


def _bert_layer(c: dict) -> Layer:
    """One ``BertLayer``: post-norm attention and feed-forward sublayers."""
    r, hp = c["initializer_range"], c["hidden_dropout_prob"]
    mha = MultiHeadAttention(c["num_attention_heads"], dropout=c["attention_probs_dropout_prob"],
                             w_init=inits.normal(r))
    mlp = MLP(c["intermediate_size"], activation=ACTIVATIONS[c["hidden_act"]],
              w_init=inits.normal(r))
    block = serial(("attention", residual(serial(("mha", mha), *_drop(hp)))),
                   ("attention_norm", LayerNorm(c["layer_norm_eps"])),
                   ("ffn", residual(serial(("mlp", mlp), *_drop(hp)))),
                   ("output_norm", LayerNorm(c["layer_norm_eps"])))
    return block._replace(name="BertLayer", meta={"torch_names": _LAYER_NAMES,
                                                  "torch_layout": _LAYER_LAYOUT},
                          spec=block.spec)


@constructor
def Bert(vocab_size: int = 30522, hidden_size: int = 768, num_hidden_layers: int = 12,
         num_attention_heads: int = 12, intermediate_size: int = 3072, hidden_act: str = "gelu",
         hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1,
         max_position_embeddings: int = 512, type_vocab_size: int = 2,
         initializer_range: float = 0.02, layer_norm_eps: float = 1e-12,
         pad_token_id: int | None = 0, *, add_pooling_layer: bool = True) -> Layer:
    """The BERT encoder, Hugging Face ``BertModel(BertConfig(...))``; the arguments are
    ``BertConfig``'s fields with its defaults (BERT-base). ``hidden_act``: ``"gelu"`` (exact),
    ``"gelu_new"``/``"gelu_pytorch_tanh"``, ``"relu"``, ``"silu"``/``"swish"``,
    ``"quick_gelu"``, ``"tanh"``. ``add_pooling_layer=False`` drops the pooler (the output is
    then ``sequence_output`` alone).

    **Input:** token ids ``[batch, T]`` (``T ≤ max_position_embeddings``). **Keywords:**
    ``token_type_ids`` (ints ``[batch, T]``, default all 0), ``attention_mask`` (``[batch, T]``,
    1 = token, 0 = padding; default all 1). **Output:** ``(sequence_output [batch, T,
    hidden_size], pooled_output [batch, hidden_size])``; ``bwd`` takes ``dy`` as that pair.
    Dropout (``train=True``, with a ``key``) as HF: embeddings, attention probabilities, each
    sublayer's output. **Params:** see the module docstring; initialised as HF's
    ``_init_weights`` (``N(0, initializer_range²)`` weights and embeddings, zero biases, unit
    LayerNorms, the pad row 0). ``fnn.torch_weights.load_state_dict(model, bert.state_dict(),
    (1, T))`` loads ``BertModel``'s weights.

    >>> import jax, jax.numpy as jnp
    >>> model = Bert(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...              intermediate_size=32, max_position_embeddings=16)
    >>> params, state, shapes = model.init(jax.random.PRNGKey(0), (2, 5))
    >>> shapes
    ((2, 5, 16), (2, 16))
    >>> ids = jnp.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    >>> (seq, pooled), _ = model.apply(params, state, ids,
    ...                                attention_mask=jnp.array([[1, 1, 1, 0, 0], [1] * 5]))
    >>> seq.shape, pooled.shape
    ((2, 5, 16), (2, 16))
    """
    args = dict(locals())
    return _build({f: args[f] for f in FIELDS}, add_pooling_layer)


@constructor
def BertForSequenceClassification(
        num_labels: int = 2, *, classifier_dropout: float | None = None, vocab_size: int = 30522,
        hidden_size: int = 768, num_hidden_layers: int = 12, num_attention_heads: int = 12,
        intermediate_size: int = 3072, hidden_act: str = "gelu", hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1, max_position_embeddings: int = 512,
        type_vocab_size: int = 2, initializer_range: float = 0.02, layer_norm_eps: float = 1e-12,
        pad_token_id: int | None = 0) -> Layer:
    """BERT with a classification head, Hugging Face ``BertForSequenceClassification``:
    ``logits = Drop(pooled_output) W_c + b_c`` (dropout ``classifier_dropout``, default
    ``hidden_dropout_prob``); the other keywords are :func:`Bert`'s (``BertConfig`` fields).
    **Input and keywords** as :func:`Bert`; **output** ``[batch, num_labels]`` logits, so
    ``fnn.backprop.value_and_grad(model, loss)`` trains it. **Params:** :func:`Bert`'s and
    ``classifier``; torch names ``bert.…`` and ``classifier.…``.

    >>> from fnn.core import output_shape
    >>> output_shape(BertForSequenceClassification(3, vocab_size=50, hidden_size=8,
    ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16), (4, 7))
    (4, 3)
    """
    args = dict(locals())
    c = {f: args[f] for f in FIELDS}
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ValueError(f"BertForSequenceClassification: num_labels must be a positive int, "
                         f"got {num_labels!r}")
    p = c["hidden_dropout_prob"] if classifier_dropout is None else classifier_dropout
    if not 0 <= p < 1:
        raise ValueError(f"BertForSequenceClassification: classifier_dropout must be in [0, 1), "
                         f"got {p!r}")
    return _build(c, True, (num_labels, p, classifier_dropout))


def _build(c: dict, add_pooling_layer: bool, classifier=None) -> Layer:
    _check(c)
    r, d = c["initializer_range"], c["hidden_size"]
    embeddings = serial(
        ("word_embeddings", Embedding(c["vocab_size"], d, w_init=inits.normal(r))),
        ("position_embeddings", PositionalEmbedding(c["max_position_embeddings"],
                                                    w_init=inits.normal(r))),
        ("token_type_embeddings", TokenTypeEmbedding(c["type_vocab_size"],
                                                     w_init=inits.normal(r))),
        ("LayerNorm", LayerNorm(c["layer_norm_eps"])), *_drop(c["hidden_dropout_prob"]))
    body = serial(("embeddings", embeddings),
                  ("encoder", stack(_bert_layer(c), c["num_hidden_layers"])))
    tail = [("pooler", serial(("select", SelectToken(0)),
                              ("dense", Dense(d, w_init=inits.normal(r))),
                              ("activation", Tanh())))] if add_pooling_layer else []
    name = (f"(vocab={c['vocab_size']}, d={d}, layers={c['num_hidden_layers']}, "
            f"heads={c['num_attention_heads']})")
    names = {"encoder": "encoder.layer"}
    meta = {"hf_config": dict(c), "add_pooling_layer": add_pooling_layer}
    if classifier is None:
        name = "Bert" + name
    else:
        num_labels, p, meta["classifier_dropout"] = classifier
        tail += [*_drop(p), ("classifier", Dense(num_labels, w_init=inits.normal(r)))]
        names = {"embeddings": "bert.embeddings", "encoder": "bert.encoder.layer",
                 "pooler": "bert.pooler", "classifier": "classifier"}
        name, meta["num_labels"] = f"BertForSequenceClassification{name}", num_labels
    meta.update(torch_names=names,
                torch_layout={"embeddings/token_type_embeddings": "embedding"})
    return _model(body, tail, add_pooling_layer and classifier is None, c, name, meta)


def _word(params):
    return params["embeddings"]["word_embeddings"]["w"]


def _with_word(params, w):
    emb = params["embeddings"]
    return {**params, "embeddings": {**emb, "word_embeddings": {**emb["word_embeddings"], "w": w}}}


def _mask(attention_mask):
    return (jnp.asarray(attention_mask) != 0)[:, None, None, :]                  # (b, 1, 1, S)


def _model(body: Layer, tail: list, pair: bool, c: dict, name: str, meta: dict) -> Layer:
    """``body`` (ids → h) then the ``tail`` layers in turn on h (pooler[, dropout,
    classifier]); the output is ``(h, tail's)`` when ``pair``, else the tail's (h if none)."""
    pad, maxlen = c["pad_token_id"], c["max_position_embeddings"]
    first = len(body.children)                       # tail layer i gets child key first + i

    def init(key, input_shape):
        if not is_shape(input_shape) or len(input_shape) != 2 or not 1 <= input_shape[1] <= maxlen:
            raise ValueError(f"{name}: expected token ids of shape (batch, T <= {maxlen}), got "
                             f"{input_shape}")
        params, state, shape = body.init(key, input_shape)
        if pad is not None:                          # HF's _init_weights zeroes the pad row
            params = _with_word(params, _word(params).at[pad].set(0))
        z = shape
        for i, (n, layer) in enumerate(tail):
            params[n], state[n], z = layer.init(child_key(key, first + i), z)
        return params, state, ((shape, z) if pair else z)

    def keywords(x, token_type_ids, attention_mask):
        if not hasattr(x, "dtype") or x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}: expected integer token ids of shape (batch, T), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if attention_mask is not None:
            m = attention_mask
            if not hasattr(m, "shape") or tuple(m.shape) != tuple(x.shape):
                raise ValueError(f"{name}: attention_mask must have the ids' shape (batch, T) = "
                                 f"{tuple(x.shape)} (1 = token, 0 = padding), got "
                                 f"{getattr(m, 'shape', type(m).__name__)}")
            kw["mask"] = _mask(m)
        return kw

    def frozen_pad(params):
        """The pad row enters the forward with no gradient (``nn.Embedding(padding_idx)``)."""
        if pad is None:
            return params
        w = _word(params)
        return _with_word(params, w.at[pad].set(lax.stop_gradient(w[pad])))

    def part(tree):
        return {k: v for k, v in tree.items() if k in dict(body.children)}

    def run(method, params, state, x, key, train, kw):
        h, new_state, *res = getattr(body, method)(part(params), part(state), x, key=key,
                                                   train=train, **kw)
        z, rest = h, {"body": res[0]} if res else {}
        for i, (n, layer) in enumerate(tail):
            z, new_state[n], *r = getattr(layer, method)(params[n], state[n], z, train=train,
                                                         key=child_key(key, first + i))
            rest.update({n: r[0]} if r else {})
        return ((h, z) if pair else z), new_state, rest

    def apply(params, state, x, *, key=None, train=False, token_type_ids=None,
              attention_mask=None):
        kw = keywords(x, token_type_ids, attention_mask)
        return run("apply", frozen_pad(params), state, x, key, train, kw)[:2]

    def fwd(params, state, x, *, key=None, train=False, token_type_ids=None,
            attention_mask=None):
        return run("fwd", params, state, x, key, train, keywords(x, token_type_ids,
                                                                  attention_mask))

    def bwd(params, state, res, dy, *, key=None, train=False, token_type_ids=None,
            attention_mask=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if attention_mask is not None:
            kw["mask"] = _mask(attention_mask)
        if pair and not (isinstance(dy, (tuple, list)) and len(dy) == 2):
            raise ValueError(f"{name}: dy must be the pair (d sequence_output, d "
                             f"pooled_output), like the output; got {type(dy).__name__}")
        dseq, dz = dy if pair else (None, dy)
        grads = {}
        for i in reversed(range(len(tail))):
            n, layer = tail[i]
            grads[n], dz = layer.bwd(params[n], state[n], res[n], dz, train=train,
                                     key=child_key(key, first + i))
        g, _ = body.bwd(part(params), part(state), res["body"], dz if dseq is None else dseq + dz,
                        key=key, train=train, **kw)
        if pad is not None:
            g = _with_word(g, _word(g).at[pad].set(0))
        return {**g, **grads}, None

    return Layer(init, apply, fwd, bwd, name, keywords={"token_type_ids", "attention_mask"},
                 children=body.children + tuple(tail),
                 stochastic=any(l.stochastic for _, l in body.children + tuple(tail)), meta=meta)


# --------------------------------------------------------------------------- Hugging Face config

def from_hf_config(config: dict) -> Layer:
    """The model of a Hugging Face ``config.json`` (a ``BertConfig`` as a dict): its fields by
    name, BertConfig's defaults for those absent; :func:`BertForSequenceClassification` when
    ``architectures`` names it (``num_labels`` from ``id2label``), else :func:`Bert`. A value
    fnn's BERT does not implement raises ``ValueError`` naming the field: ``model_type`` other
    than ``"bert"``, ``position_embedding_type`` other than ``"absolute"``, ``is_decoder`` or
    ``add_cross_attention`` true, a ``hidden_act`` fnn has no derivative for."""
    if not isinstance(config, dict):
        raise TypeError(f"bert.from_hf_config: expected a dict (config.json), got "
                        f"{type(config).__name__}")
    unsupported = {"model_type": ("bert",), "position_embedding_type": ("absolute",),
                   "is_decoder": (False,), "add_cross_attention": (False,)}
    for field, ok in unsupported.items():
        if field in config and config[field] not in ok:
            raise ValueError(f"bert.from_hf_config: {field}={config[field]!r} is not supported "
                             f"(fnn's Bert implements {field}={ok[0]!r})")
    if "hidden_act" in config and config["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"bert.from_hf_config: hidden_act={config['hidden_act']!r} is not "
                         f"supported; one of {sorted(ACTIVATIONS)}")
    fields = {f: config[f] for f in FIELDS if f in config}
    if "BertForSequenceClassification" in (config.get("architectures") or ()):
        labels = config.get("id2label")
        num_labels = len(labels) if labels else config.get("num_labels", 2)
        return BertForSequenceClassification(num_labels,
                                             classifier_dropout=config.get("classifier_dropout"),
                                             **fields)
    return Bert(**fields)


def hf_config(model: Layer) -> dict:
    """The ``config.json`` fields of a :func:`Bert` or :func:`BertForSequenceClassification`
    (``model_type`` ``"bert"``, ``architectures``, every ``BertConfig`` field the model is built
    from; for the classifier ``id2label``/``label2id`` and ``classifier_dropout``)."""
    if not isinstance(model, Layer) or model.kind not in ("Bert", "BertForSequenceClassification"):
        raise TypeError(f"bert.hf_config: expected a model built by fnn.models.Bert or "
                        f"BertForSequenceClassification, got {model!r}")
    config = {"model_type": "bert", "architectures": [model.kind if model.kind != "Bert"
                                                      else "BertModel"],
              "position_embedding_type": "absolute", **model.meta["hf_config"]}
    if model.kind == "BertForSequenceClassification":
        n = model.meta["num_labels"]
        config.update(id2label={str(i): f"LABEL_{i}" for i in range(n)},
                      label2id={f"LABEL_{i}": i for i in range(n)},
                      classifier_dropout=model.meta["classifier_dropout"])
    return config


def hf_input_shape(config: dict) -> tuple:
    """The input shape the weights load with: ``(1, min(8, max_position_embeddings))`` ids
    (parameter shapes do not depend on the length)."""
    return (1, min(8, int(config.get("max_position_embeddings", 512))))
