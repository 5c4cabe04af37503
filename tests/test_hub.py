"""fnn.models.hub: hub directories written and read back without torch (a tiny GPT-2-named model
from tests/hub_fake.py registered as "gpt2"); files checked byte-level against the safetensors
format (and by the safetensors package where installed); errors name the file."""
import builtins
import json
import os
import struct

import jax
import numpy as np
import pytest

import hub_fake
from fnn import checkpoint
from fnn.models import hub
from fnn.torch_weights import StateDictError


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(hub.REGISTRY, "gpt2", "hub_fake")
    model = hub_fake.TinyLM()
    params, state, _ = model.init(jax.random.PRNGKey(0), (1, 6))
    params = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
                          params)
    return model, params, state


def _header(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    return json.loads(raw[8:8 + n])


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_single_file_round_trip(tmp_path, fake):
    model, params, state = fake
    d = tmp_path / "tiny"
    hub.save_pretrained(d, model, params, state)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    config = json.load(open(d / "config.json"))
    assert config["model_type"] == "gpt2" and config["n_embd"] == 4 and config["dtype"] == "float64"
    header = _header(d / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    assert sorted(header) == ["transformer.ln_f.bias", "transformer.ln_f.weight",
                              "transformer.wpe.weight", "transformer.wte.weight"]   # no lm_head
    got_model, got_params, got_state = hub.from_pretrained(d)
    assert got_model == model
    _same((got_params, got_state), (params, state))
    st = pytest.importorskip("safetensors.numpy")
    sd = st.load_file(str(d / "model.safetensors"))
    np.testing.assert_array_equal(sd["transformer.wte.weight"], params["wte"]["w"])


def test_sharded_round_trip(tmp_path, fake):
    model, params, state = fake
    d = tmp_path / "tiny"
    hub.save_pretrained(d, model, params, state, max_shard_size="100B", dtype=np.float32)
    index = json.load(open(d / "model.safetensors.index.json"))
    files = sorted(f for f in os.listdir(d) if f.startswith("model-"))
    assert files == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert set(index["weight_map"].values()) == set(files)
    sizes = {"transformer.wte.weight": 44, "transformer.wpe.weight": 24,
             "transformer.ln_f.weight": 4, "transformer.ln_f.bias": 4}
    assert index["metadata"] == {"total_parameters": 76, "total_size": 4 * 76}
    assert set(index["weight_map"]) == set(sizes)
    for f in files:
        header = _header(d / f)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert {k for k, v in index["weight_map"].items() if v == f} == set(header)
        assert sum(4 * sizes[k] for k in header) <= 100 or len(header) == 1
    _, got, _ = hub.from_pretrained(d, dtype=np.float32)
    _same(got, jax.tree.map(lambda a: np.asarray(a, np.float32), params))


def test_reading_needs_neither_torch_nor_safetensors(tmp_path, fake, monkeypatch):
    model, params, state = fake
    hub.save_pretrained(tmp_path / "m", model, params, state, max_shard_size=200)
    real = builtins.__import__

    def blocked(name, *a, **k):
        if name.split(".")[0] in ("torch", "safetensors", "transformers"):
            raise ImportError(f"no {name}")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", blocked)
    _same(hub.from_pretrained(tmp_path / "m")[1], params)


def test_base_model_checkpoint_gets_the_prefix(tmp_path, fake):
    model, params, state = fake
    d = tmp_path / "m"
    hub.save_pretrained(d, model, params, state)
    sd = hub.read_weights(d)
    hub.write_weights(d, {k.removeprefix("transformer."): v for k, v in sd.items()},
                      json.load(open(d / "config.json")))          # as GPT2Model names them
    _same(hub.from_pretrained(d)[1], params)
    with pytest.warns(UserWarning, match=r"1 tensors outside 'transformer' \(a head: lm_head"):
        out = hub._match_prefix({"transformer.a": 1, "lm_head.weight": 2}, {"a": (1,)},
                                "transformer")
    assert out == {"a": 1}


def test_saving_replaces_weights_keeps_other_files_and_is_atomic(tmp_path, fake, monkeypatch):
    model, params, state = fake
    d = tmp_path / "m"
    hub.save_pretrained(d, model, params, state, max_shard_size=100)
    (d / "tokenizer.json").write_text("{}")
    hub.save_pretrained(d, model, params, state)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "tokenizer.json"]
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    calls = []

    def failing(path, arrays):
        calls.append(path)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hub, "_write_file", failing)
    with pytest.raises(OSError, match="No space left"):
        hub.save_pretrained(d, model, jax.tree.map(lambda a: a + 1, params), state)
    assert calls and {f: (d / f).read_bytes() for f in os.listdir(d)} == before
    assert os.listdir(tmp_path) == ["m"]                         # no temporary left behind


def test_reading_errors_name_the_file(tmp_path, fake):
    model, params, state = fake
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nothing has no config.json"):
        hub.from_pretrained(tmp_path / "nothing")
    d = tmp_path / "m"
    hub.save_pretrained(d, model, params, state, max_shard_size=100)
    index = json.load(open(d / "model.safetensors.index.json"))
    first = sorted(set(index["weight_map"].values()))[0]
    data = (d / first).read_bytes()
    (d / first).write_bytes(data[:-3])
    with pytest.raises(checkpoint.CheckpointError, match=f"{first}: truncated"):
        hub.from_pretrained(d)
    os.remove(d / first)
    with pytest.raises(FileNotFoundError, match=f"lists the shard {first}, which is not in"):
        hub.from_pretrained(d)
    hub.save_pretrained(d, model, params, state, max_shard_size=100)
    index["weight_map"]["transformer.extra"] = first
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"'transformer.extra' is in the index but not in "
                                         f".*{first}"):
        hub.from_pretrained(d)
    config = json.load(open(d / "config.json"))
    (d / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ValueError, match=r"model_type 't5' is not one fnn builds"):
        hub.from_pretrained(d)
    for f in os.listdir(d):
        os.remove(d / f)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors and no model.safetensors"):
        hub.from_pretrained(d)


def test_weights_that_do_not_fit_the_config(tmp_path, fake):
    model, params, state = fake
    d = tmp_path / "m"
    hub.save_pretrained(d, model, params, state)
    config = json.load(open(d / "config.json"))
    (d / "config.json").write_text(json.dumps({**config, "n_embd": 6}))
    with pytest.raises(StateDictError, match="shape: 'transformer.wte.weight' is \\(11, 4\\)"):
        hub.from_pretrained(d)


def test_registry_and_unregistered_models(tmp_path, fake, monkeypatch):
    model, params, state = fake
    monkeypatch.setitem(hub.REGISTRY, "gpt2", "fnn.models.gpt2_not_there")
    with pytest.raises(ValueError, match="not built by a registered hub module"):
        hub.save_pretrained(tmp_path / "m", model, params, state)
    hub.register("tiny", "hub_fake")
    monkeypatch.setitem(hub.REGISTRY, "tiny", "hub_fake")              # undone after the test
    with pytest.raises(ValueError, match="hub_fake.hf_config gave model_type 'gpt2', registered "
                                         "as 'tiny'"):
        hub.save_pretrained(tmp_path / "m", model, params, state)
    with pytest.raises(ValueError, match="max_shard_size is a positive int"):
        hub.write_weights(tmp_path / "w", {}, {}, max_shard_size="lots")
    assert not os.path.exists(tmp_path / "m")
