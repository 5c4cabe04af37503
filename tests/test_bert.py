"""fnn.models.Bert: the forward against a float64 NumPy reference of BERT's published equations
(Devlin et al. 2019, as Hugging Face's BertModel computes them: post-norm layers, exact GELU,
the additive padding mask, the tanh pooler) with padding and token types; the hand backward
against jax.vjp (eval and train); the pad row; configuration checks and the Hugging Face config
functions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.models import Bert, BertForSequenceClassification
from fnn.models import bert as bert_module

from helpers import assert_trees_close, no_autodiff, tree_scale

CFG = dict(vocab_size=23, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=12, max_position_embeddings=9, type_vocab_size=3,
           hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.2, pad_token_id=1)
ERF = np.vectorize(math.erf)
IDS = np.array([[2, 7, 9, 4, 1, 1], [3, 5, 1, 11, 8, 22]])          # 1 is the pad token
TYPES = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 2, 2, 2]])
MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def randomized(params, seed=0):
    """Every parameter drawn anew (norm scales around 1), so no zero bias or unit scale hides a
    mistake."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        last = path[-1].key
        mean = 1.0 if last == "scale" else 0.0
        return jnp.asarray(rng.normal(mean, 0.3 if last in ("scale", "offset", "b") else 0.5,
                                      a.shape))
    return jax.tree_util.tree_map_with_path(draw, params)


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_bert(P, ids, types, mask, heads, eps):
    """BertModel's forward in float64 NumPy from the equations, weights (in, out)."""
    P = jax.tree.map(np.asarray, P)
    E = P["embeddings"]
    b, t = ids.shape
    h = E["word_embeddings"]["w"][ids] + E["position_embeddings"]["w"][:t][None] \
        + E["token_type_embeddings"]["w"][types]
    h = layer_norm(h, E["LayerNorm"]["scale"], E["LayerNorm"]["offset"], eps)
    ext = (1.0 - mask[:, None, None, :]) * np.finfo(np.float64).min    # HF's additive mask
    L = P["encoder"]
    for i in range(L["attention_norm"]["scale"].shape[0]):
        at = lambda tree: jax.tree.map(lambda a: a[i], tree)
        A, F = at(L["attention"]["mha"]), at(L["ffn"]["mlp"])
        n1, n2 = at(L["attention_norm"]), at(L["output_norm"])
        d = h.shape[-1] // heads
        split = lambda z: z.reshape(b, t, heads, d).transpose(0, 2, 1, 3)       # (b, H, t, d)
        q, k, v = (split(h @ A[n]["w"] + A[n]["b"]) for n in "qkv")
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + ext
        p = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        h1 = layer_norm(h + ctx @ A["o"]["w"] + A["o"]["b"], n1["scale"], n1["offset"], eps)
        z = h1 @ F["fc1"]["w"] + F["fc1"]["b"]
        ff = 0.5 * z * (1 + ERF(z / math.sqrt(2))) @ F["fc2"]["w"] + F["fc2"]["b"]
        h = layer_norm(h1 + ff, n2["scale"], n2["offset"], eps)
    pooled = np.tanh(h[:, 0] @ P["pooler"]["dense"]["w"] + P["pooler"]["dense"]["b"])
    return h, pooled


@pytest.fixture(scope="module")
def model_and_params():
    model = Bert(**CFG)
    params, state, shapes = model.init(jax.random.PRNGKey(0), IDS.shape)
    assert shapes == ((2, 6, 8), (2, 8))
    return model, randomized(params), state


def test_forward_matches_numpy_with_padding_and_token_types(model_and_params):
    model, params, state = model_and_params
    (seq, pooled), (seq0, _) = jax.jit(lambda p, ids, tt, m: (
        model.apply(p, state, ids, token_type_ids=tt, attention_mask=m)[0],
        model.apply(p, state, ids)[0]))(params, jnp.asarray(IDS), jnp.asarray(TYPES),
                                        jnp.asarray(MASK))
    ref_seq, ref_pooled = np_bert(params, IDS, TYPES, MASK, 2, 1e-12)
    np.testing.assert_allclose(seq, ref_seq, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-12, atol=1e-12)
    # the keywords matter: without them the types are 0 and every token is attended to
    ref0, _ = np_bert(params, IDS, 0 * TYPES, 1 + 0 * MASK, 2, 1e-12)
    np.testing.assert_allclose(seq0, ref0, rtol=1e-12, atol=1e-12)
    assert np.abs(np.asarray(seq0) - ref_seq).max() > 1e-3


def test_hand_backward_matches_vjp(model_and_params, monkeypatch):
    """bwd of fwd's residuals against jax.vjp of apply (w.r.t. params; the ids are integers),
    eval mode (train mode, every dropout, in the classifier test below); the pad token's
    embedding row gets no gradient (nn.Embedding(padding_idx))."""
    model, params, state = model_and_params
    rng = np.random.default_rng(1)
    dy = (jnp.asarray(rng.normal(size=(2, 6, 8))), jnp.asarray(rng.normal(size=(2, 8))))
    kw = dict(token_type_ids=jnp.asarray(TYPES), attention_mask=jnp.asarray(MASK))
    real_vjp = jax.vjp

    def run(params, dy):
        y, vjp = real_vjp(lambda p: model.apply(p, state, jnp.asarray(IDS), **kw)[0], params)
        y2, _, res = model.fwd(params, state, jnp.asarray(IDS), **kw)
        return y, y2, vjp(dy)[0], model.bwd(params, state, res, dy, **kw)
    with no_autodiff(monkeypatch):
        y, y2, ref, (got, dx) = jax.jit(run)(params, dy)
    assert_trees_close(y2, y, rtol=1e-12, atol=1e-12, what="fwd != apply")
    assert_trees_close(got, ref, rtol=1e-9, atol=1e-11 * tree_scale(ref), what="bwd vs jax.vjp")
    word = np.asarray(got["embeddings"]["word_embeddings"]["w"])
    assert dx is None and np.all(word[1] == 0) and np.abs(word[[2, 3, 7]]).min() > 0


def test_init_pad_row_zero_and_no_pooler():
    model = Bert(**{**CFG, "num_hidden_layers": 1}, add_pooling_layer=False)
    params, state, shape = model.init(jax.random.PRNGKey(1), (1, 4))
    assert shape == (1, 4, 8) and "pooler" not in params
    w = np.asarray(params["embeddings"]["word_embeddings"]["w"])
    assert np.all(w[1] == 0) and np.all(w[2] != 0) and abs(w[2:].std() - 0.02) < 0.01
    assert model.keywords == {"token_type_ids", "attention_mask"}


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 7), ("hidden_act", "gelu_fast"), ("num_hidden_layers", 0),
    ("hidden_dropout_prob", 1.0), ("layer_norm_eps", 0.0), ("pad_token_id", 23)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Bert(**{**CFG, field: value})


@pytest.mark.parametrize("field,value", [
    ("model_type", "roberta"), ("position_embedding_type", "relative_key"),
    ("is_decoder", True), ("add_cross_attention", True), ("hidden_act", "mish")])
def test_from_hf_config_rejects_what_it_does_not_implement(field, value):
    with pytest.raises(ValueError, match=field):
        bert_module.from_hf_config({**CFG, "model_type": "bert", field: value})


def test_hf_config_round_trip():
    model = bert_module.from_hf_config({**CFG, "model_type": "bert", "architectures":
                                        ["BertModel"], "torch_dtype": "float32"})
    assert model == Bert(**CFG)
    config = bert_module.hf_config(model)
    assert config["model_type"] == "bert" and config["hidden_act"] == "gelu"
    assert {k: config[k] for k in CFG} == CFG and config["layer_norm_eps"] == 1e-12
    assert bert_module.from_hf_config(config) == model
    assert bert_module.hf_input_shape(config) == (1, 8)
    with pytest.raises(TypeError, match="Bert"):
        bert_module.hf_config(Bert(**CFG).children[0][1])


def test_bad_inputs_say_what_was_expected(model_and_params):
    model, params, state = model_and_params
    ids = jnp.asarray(IDS)
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply(params, state, ids, attention_mask=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="token_type_ids"):
        model.apply(params, state, ids, token_type_ids=jnp.ones((2, 6)))      # floats
    with pytest.raises(ValueError, match="token type id 3"):
        model.apply(params, state, ids, token_type_ids=jnp.full((2, 6), 3))
    with pytest.raises(ValueError, match="integer token ids"):
        model.apply(params, state, ids.astype(jnp.float64))
    with pytest.raises(ValueError, match="T <= 9"):
        model.init(jax.random.PRNGKey(0), (1, 10))
    with pytest.raises(TypeError, match="unexpected keyword"):
        model.apply(params, state, ids, mask=None)


def test_sequence_classifier_matches_numpy_and_autodiff(monkeypatch):
    """BertForSequenceClassification: logits = pooled W_c + b_c (NumPy), and
    fnn.backprop.value_and_grad's hand gradient of the cross-entropy against jax.grad, train
    mode (dropout in the embeddings, attention, sublayers and before the classifier), one
    compilation; and against eval mode, so the dropout is there."""
    from fnn import backprop, losses
    cfg = {**CFG, "num_hidden_layers": 1}
    model = BertForSequenceClassification(3, classifier_dropout=0.3, **cfg)
    params, state, shape = model.init(jax.random.PRNGKey(2), IDS.shape)
    assert shape == (2, 3) and sorted(params) == ["classifier", "dropout", "embeddings", "encoder",
                                                 "pooler"]
    params = randomized(params, seed=2)
    ids, labels, key = jnp.asarray(IDS), jnp.array([0, 2]), jax.random.PRNGKey(5)
    kw = dict(token_type_ids=jnp.asarray(TYPES), attention_mask=jnp.asarray(MASK))
    loss = losses.softmax_cross_entropy_with_integer_labels
    hand = backprop.value_and_grad(model, loss)
    real_grad = jax.grad

    def run(params):
        logits = model.apply(params, state, ids, **kw)[0]
        ref = real_grad(lambda p: loss(model.apply(p, state, ids, key=key, train=True, **kw)[0],
                                       labels))(params)
        (value, _), grads = hand(params, state, ids, labels, key=key, train=True, **kw)
        return logits, ref, grads, value, loss(logits, labels)
    with no_autodiff(monkeypatch):
        logits, ref, got, train_loss, eval_loss = jax.jit(run)(params)
    assert abs(train_loss - eval_loss) > 1e-3
    _, pooled = np_bert(params, IDS, TYPES, MASK, 2, 1e-12)
    C = jax.tree.map(np.asarray, params["classifier"])
    np.testing.assert_allclose(logits, pooled @ C["w"] + C["b"], rtol=1e-12, atol=1e-12)
    assert_trees_close(got, ref, rtol=1e-9, atol=1e-11 * tree_scale(ref), what="classifier")
    config = bert_module.hf_config(model)
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert len(config["id2label"]) == 3 and config["classifier_dropout"] == 0.3
    assert bert_module.from_hf_config(config) == model
    with pytest.raises(ValueError, match="num_labels"):
        BertForSequenceClassification(0, **cfg)
