"""BERT and the Vision Transformer against the reference implementations, where installed:
Hugging Face ``transformers.BertModel`` and ``torchvision.models.VisionTransformer``, random
weights (moved off their initial values, so no zero bias or unit norm hides a mistake) loaded
into fnn by ``fnn.torch_weights.load_state_dict``, float64, eval mode. Outputs agree within 1e-9
(BERT with padding and token types), the hand-derived gradient of a scalar loss within 1e-8 of
torch autograd (every parameter, and the image for ViT), and what fnn saves back (a
``state_dict``; for BERT a hub directory) loads in the reference and gives its outputs."""
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn.backprop
import fnn.losses
import fnn.models
from fnn.models import Bert, VisionTransformer
from fnn.torch_weights import load_state_dict, state_dict

torch = pytest.importorskip("torch")

BERT = dict(vocab_size=23, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=9, type_vocab_size=3, pad_token_id=1)
IDS = np.array([[2, 7, 9, 4, 1, 1], [3, 5, 1, 11, 8, 22]])          # 1 is the pad token
TYPES = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 2, 2, 2]])
MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
VIT = dict(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
           num_classes=5)


def _torchvision():
    """torchvision, or None where it is not installed. A torchvision wheel built for CUDA on a
    CPU-only torch loads none of its compiled ops and then fails in its own import (``operator
    torchvision::nms does not exist``), and so does ``import transformers``, which imports it
    when installed; the model classes need no compiled op, so the two operator schemas it
    registers fakes for are declared and the import retried."""
    try:
        import torchvision
        return torchvision
    except ImportError:
        return None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for m in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[m]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision.lib = lib                                          # keep the definitions alive
    import torchvision
    return torchvision


def import_torchvision():
    return _torchvision() or pytest.skip("torchvision is not installed")


def import_transformers():
    _torchvision()                             # importable first, where installed (see above)
    return pytest.importorskip("transformers")


def perturbed(module, seed):
    """``module`` in float64, eval mode, every parameter moved by N(0, 0.3²)."""
    torch.manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def numpy_sd(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def grads_close(module, fnn_grads_sd, tol):
    """Every parameter's torch gradient against fnn's gradient written in torch's layout."""
    for name, p in module.named_parameters():
        np.testing.assert_allclose(fnn_grads_sd[name], p.grad.numpy(), rtol=0, atol=tol,
                                   err_msg=name)


# --------------------------------------------------------------------------- BERT

def bert_reference(seed=0):
    transformers = import_transformers()
    return perturbed(transformers.BertModel(transformers.BertConfig(**BERT)), seed)


def bert_inputs(as_torch):
    f = torch.tensor if as_torch else jnp.asarray
    return dict(token_type_ids=f(TYPES), attention_mask=f(MASK))


def hf_out(hf):
    out = hf(input_ids=torch.tensor(IDS), **bert_inputs(True))
    return out.last_hidden_state, out.pooler_output


def test_bert_outputs_and_gradients_match_transformers():
    hf = bert_reference()
    model = Bert(**BERT)
    params, state = load_state_dict(model, numpy_sd(hf), IDS.shape, dtype=jnp.float64)
    (seq, pooled), _ = model.apply(params, state, jnp.asarray(IDS), **bert_inputs(False))
    ref_seq, ref_pooled = hf_out(hf)
    np.testing.assert_allclose(seq, ref_seq.detach().numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(pooled, ref_pooled.detach().numpy(), rtol=0, atol=1e-9)

    rng = np.random.default_rng(1)             # loss = Σ seq ⊙ A + Σ pooled ⊙ B
    a, b = rng.normal(size=ref_seq.shape), rng.normal(size=ref_pooled.shape)
    ((ref_seq * torch.tensor(a)).sum() + (ref_pooled * torch.tensor(b)).sum()).backward()
    _, _, res = model.fwd(params, state, jnp.asarray(IDS), **bert_inputs(False))
    grads, _ = model.bwd(params, state, res, (jnp.asarray(a), jnp.asarray(b)),
                         **bert_inputs(False))
    grads_close(hf, state_dict(model, grads, state, IDS.shape), 1e-8)
    assert np.all(hf.embeddings.word_embeddings.weight.grad.numpy()[1] == 0)   # the pad row


def test_bert_saved_back_loads_in_transformers(tmp_path):
    transformers = import_transformers()
    hf = bert_reference(seed=1)
    model = Bert(**BERT)
    sd = numpy_sd(hf)
    params, state = load_state_dict(model, sd, IDS.shape, dtype=jnp.float64)
    # fine-tune a little in fnn, then back: a state_dict and a hub directory
    (_, _), _, res = model.fwd(params, state, jnp.asarray(IDS), **bert_inputs(False))
    ones = (jnp.ones((2, 6, 8)), jnp.ones((2, 8)))
    grads, _ = model.bwd(params, state, res, ones, **bert_inputs(False))
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    (seq, pooled), _ = model.apply(params, state, jnp.asarray(IDS), **bert_inputs(False))

    back = state_dict(model, params, state, IDS.shape)
    assert set(back) == set(sd)
    again, _ = load_state_dict(model, back, IDS.shape, dtype=jnp.float64)
    jax.tree.map(np.testing.assert_array_equal, again, params)              # bit for bit
    hf.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)
    for got, want in zip(hf_out(hf), (seq, pooled)):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-9)

    fnn.models.save_pretrained(tmp_path / "fnn_bert", model, params, state)
    hub = transformers.BertModel.from_pretrained(tmp_path / "fnn_bert", dtype=torch.float64)
    for got, want in zip(hf_out(hub.eval()), (seq, pooled)):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-9)


def test_bert_hub_directory_written_by_transformers(tmp_path):
    """BertModel's directory, and a pre-training checkpoint's (``bert.…`` plus the ``cls.…``
    heads, as the hub's bert-base-uncased): the base model is read from under ``bert.``."""
    transformers = import_transformers()
    hf = bert_reference(seed=2)
    pre = perturbed(transformers.BertForPreTraining(transformers.BertConfig(**BERT)), seed=5)
    hf.save_pretrained(tmp_path / "hf_bert")
    pre.save_pretrained(tmp_path / "hf_pre")
    for directory, ref in (("hf_bert", hf), ("hf_pre", pre.bert)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, params, state = fnn.models.from_pretrained(tmp_path / directory,
                                                              dtype=jnp.float64)
        assert model == Bert(**BERT)
        assert any("cls.predictions" in str(w.message) for w in caught) == (directory == "hf_pre")
        (seq, pooled), _ = model.apply(params, state, jnp.asarray(IDS), **bert_inputs(False))
        for got, want in zip(hf_out(ref), (seq, pooled)):
            np.testing.assert_allclose(want, got.detach().numpy(), rtol=0, atol=1e-9)


def test_bert_sequence_classifier_matches_transformers(tmp_path):
    """BertForSequenceClassification (keys ``bert.…``, ``classifier.…``): logits, the hand
    gradient of the cross-entropy, and its hub directory both ways."""
    transformers = import_transformers()
    config = transformers.BertConfig(**BERT, num_labels=3)
    hf = perturbed(transformers.BertForSequenceClassification(config), seed=4)
    model = fnn.models.BertForSequenceClassification(3, **BERT)
    params, state = load_state_dict(model, numpy_sd(hf), IDS.shape, dtype=jnp.float64)
    labels = np.array([2, 0])
    out = hf(input_ids=torch.tensor(IDS), labels=torch.tensor(labels), **bert_inputs(True))
    out.loss.backward()
    loss = fnn.losses.softmax_cross_entropy_with_integer_labels
    (value, _, logits), grads = fnn.backprop.value_and_grad(model, loss, with_output=True)(
        params, state, jnp.asarray(IDS), jnp.asarray(labels), train=False, **bert_inputs(False))
    np.testing.assert_allclose(logits, out.logits.detach().numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(value, out.loss.item(), rtol=0, atol=1e-9)
    grads_close(hf, state_dict(model, grads, state, IDS.shape), 1e-8)

    fnn.models.save_pretrained(tmp_path / "fnn_cls", model, params, state)
    hub = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "fnn_cls", dtype=torch.float64).eval()
    got = hub(input_ids=torch.tensor(IDS), **bert_inputs(True)).logits
    np.testing.assert_allclose(got.detach().numpy(), logits, rtol=0, atol=1e-9)
    hf.save_pretrained(tmp_path / "hf_cls")
    again, p2, s2 = fnn.models.from_pretrained(tmp_path / "hf_cls", dtype=jnp.float64)
    assert again == model
    np.testing.assert_allclose(again.apply(p2, s2, jnp.asarray(IDS), **bert_inputs(False))[0],
                               out.logits.detach().numpy(), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- ViT

@pytest.mark.parametrize("rep", [None, 6])
def test_vit_matches_torchvision_and_saves_back(rep):
    tv = import_torchvision()
    ref = perturbed(tv.models.VisionTransformer(**VIT, representation_size=rep), seed=3)
    model = VisionTransformer(**VIT, representation_size=rep)
    shape = (1, 8, 8, 3)
    sd = numpy_sd(ref)
    params, state = load_state_dict(model, sd, shape, dtype=jnp.float64)
    x = torch.tensor(np.random.default_rng(4).normal(size=(2, 3, 8, 8)), requires_grad=True)
    x_nhwc = jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))
    out = ref(x)
    y, _ = model.apply(params, state, x_nhwc)
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=0, atol=1e-9)

    dy = np.random.default_rng(5).normal(size=out.shape)
    (out * torch.tensor(dy)).sum().backward()
    grads, dx = model.backward(params, state, x_nhwc, jnp.asarray(dy))
    grads_close(ref, state_dict(model, grads, state, shape), 1e-8)
    np.testing.assert_allclose(dx, x.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-8)

    back = state_dict(model, params, state, shape)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)               # bit for bit
    fresh = tv.models.VisionTransformer(**VIT, representation_size=rep).double().eval()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)
    np.testing.assert_allclose(fresh(x).detach().numpy(), y, rtol=0, atol=1e-9)
