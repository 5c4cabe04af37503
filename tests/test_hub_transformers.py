"""fnn.models.hub against the real thing: directories transformers' save_pretrained writes
(single file and sharded) read by fnn, and directories fnn writes loaded by
transformers.AutoModelForCausalLM; end to end with GPT-2 with no blocks (tests/hub_fake.py).
Skipped unless torch and transformers are installed."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hub_fake  # noqa: E402
from fnn.models import hub  # noqa: E402

transformers.logging.set_verbosity_error()


def _gpt2(n_layer=2, base=False):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=8, bos_token_id=0, eos_token_id=0)
    return (transformers.GPT2Model if base else transformers.GPT2LMHeadModel)(config).eval()


def _torch_sd(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shard", [None, "10KB"])
def test_reads_what_transformers_writes(tmp_path, shard):
    model = _gpt2()
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    assert os.path.exists(tmp_path / ("model.safetensors" if shard is None
                                      else "model.safetensors.index.json"))
    got, want = hub.read_weights(tmp_path), _torch_sd(model)
    del want["lm_head.weight"]                                  # tied: transformers leaves it out
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("shard", [None, 10_000])
def test_transformers_reads_what_fnn_writes(tmp_path, shard):
    model = _gpt2()
    sd = _torch_sd(model)
    del sd["lm_head.weight"]
    hub.write_weights(tmp_path, sd, model.config.to_dict(), max_shard_size=shard)
    if shard is not None:
        index = json.load(open(tmp_path / "model.safetensors.index.json"))
        assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for k, v in _torch_sd(model).items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v)
    ids = torch.tensor([[1, 4, 9, 16]])
    with torch.no_grad():
        np.testing.assert_array_equal(back(ids).logits.numpy(), model(ids).logits.numpy())


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(hub.REGISTRY, "gpt2", "hub_fake")


@pytest.mark.parametrize("base", [False, True])
def test_end_to_end_with_a_blockless_gpt2(tmp_path, tiny, base):
    """transformers → fnn (logits agree) → fnn's save_pretrained → transformers (logits agree,
    weights bit-equal)."""
    model = _gpt2(n_layer=0, base=base)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    fnn_model, params, state = hub.from_pretrained(tmp_path / "hf", dtype=np.float32)
    assert fnn_model == hub_fake.TinyLM(50, 16, 8)
    ids = np.array([[1, 4, 9, 16, 25]])
    logits = np.asarray(fnn_model.apply(params, state, ids)[0])
    with torch.no_grad():
        h = model(torch.from_numpy(ids))
        want = (h.last_hidden_state @ model.wte.weight.T if base else h.logits).numpy()
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
    hub.save_pretrained(tmp_path / "fnn", fnn_model, params, state)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fnn").eval()
    want = {("transformer." if base else "") + k: v for k, v in _torch_sd(model).items()}
    want["lm_head.weight"] = want["transformer.wte.weight"]
    assert set(back.state_dict()) == set(want)
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), want[k])
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(ids)).logits.numpy(), logits,
                                   atol=1e-5, rtol=1e-5)
