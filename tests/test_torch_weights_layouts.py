"""fnn.torch_weights: declared layouts (meta["torch_layout"] / layout=), `{i}` stack names,
tied aliases (meta["torch_tied"] and the `tied` combinator) and mis-typed tensors. Each loaded
parameter is checked against the PyTorch tensor by the layout's own rule, written out here in
NumPy (transpose, split, reshape), and the models' outputs against NumPy references."""
import numpy as np
import pytest

import torch_refs as R
from fnn import serial, stack, tied
from fnn import layers as L
from fnn.torch_weights import StateDictError, load_state_dict


def named(layer, **meta):
    return layer._replace(meta={**layer.meta, **meta})


def test_dense_conv1d_layout_reads_in_out_and_never_guesses_a_square(rng):
    w = rng.normal(size=(4, 4))
    sd = {"weight": w, "bias": rng.normal(size=4)}
    linear, _ = load_state_dict(L.Dense(4), sd, (1, 4))
    conv1d, _ = load_state_dict(named(L.Dense(4), torch_layout={"": "conv1d"}), sd, (1, 4))
    np.testing.assert_array_equal(linear["w"], w.T)         # nn.Linear: (out, in)
    np.testing.assert_array_equal(conv1d["w"], w)           # HF Conv1D: (in, out)
    by_arg, _ = load_state_dict(serial(L.Dense(4)), {f"0.{k}": v for k, v in sd.items()},
                                (1, 4), layout={"0": "conv1d"})
    np.testing.assert_array_equal(by_arg["0"]["w"], w)
    sd["weight"] = rng.normal(size=(5, 3))                  # Conv1D (in=5 ≠ 3): shape checked
    with pytest.raises(StateDictError, match=r"shape: 'weight' is \(5, 3\).* needs \(3, 4\)"):
        load_state_dict(named(L.Dense(4), torch_layout={"": "conv1d"}), sd, (1, 3))


def _attn_sd(rng, names, d, kv, bias, fmt="linear"):
    out = {"q": d, "k": kv, "v": kv, "o": d}
    sd = {}
    for n, name in names.items():
        shape = (out[n], d) if fmt == "linear" else (d, out[n])
        sd[f"attn.{name}.weight"] = rng.normal(size=shape)
        if bias:
            sd[f"attn.{name}.bias"] = rng.normal(size=out[n])
    return sd


@pytest.mark.parametrize("names,bias", [
    ({"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}, False),          # Llama
    ({"q": "self.query", "k": "self.key", "v": "self.value", "o": "output.dense"}, True)])
def test_attention_linear_modules(rng, names, bias):
    mha = L.MultiHeadAttention(4, num_kv_heads=2 if not bias else None, use_bias=bias)
    model = named(serial(("attn", mha)), torch_layout={"attn": names})
    kv = 4 if not bias else 8
    sd = _attn_sd(rng, names, 8, kv, bias)
    params, state = load_state_dict(model, sd, (2, 3, 8))
    for n in "qkvo":
        np.testing.assert_array_equal(params["attn"][n]["w"], sd[f"attn.{names[n]}.weight"].T)
        assert ("b" in params["attn"][n]) == bias
        if bias:
            np.testing.assert_array_equal(params["attn"][n]["b"], sd[f"attn.{names[n]}.bias"])
    if bias:                                # same numbers as nn.MultiheadAttention's packing
        packed = {"in_proj_weight": np.concatenate([sd[f"attn.{names[n]}.weight"] for n in "qkv"]),
                  "in_proj_bias": np.concatenate([sd[f"attn.{names[n]}.bias"] for n in "qkv"]),
                  "out_proj.weight": sd["attn.output.dense.weight"],
                  "out_proj.bias": sd["attn.output.dense.bias"]}
        x = rng.normal(size=(2, 3, 8))
        np.testing.assert_allclose(model.apply(params, state, x)[0], R.mha(x, packed, 4),
                                   atol=1e-12)


@pytest.mark.parametrize("fmt", ["conv1d", "linear"])
def test_attention_fused_qkv_split(rng, fmt):
    d = 6
    w = rng.normal(size=(d, 3 * d) if fmt == "conv1d" else (3 * d, d))
    sd = {"c_attn.weight": w, "c_attn.bias": rng.normal(size=3 * d),
          "c_proj.weight": rng.normal(size=(d, d)), "c_proj.bias": rng.normal(size=d)}
    model = named(L.MultiHeadAttention(2, causal=True),
                  torch_layout={"": {"qkv": "c_attn", "o": "c_proj", "format": fmt}})
    params, _ = load_state_dict(model, sd, (1, 4, d))
    full = w if fmt == "conv1d" else w.T                    # (in, 3d)
    for i, n in enumerate("qkv"):
        np.testing.assert_array_equal(params[n]["w"], full[:, i * d:(i + 1) * d])
        np.testing.assert_array_equal(params[n]["b"], sd["c_attn.bias"][i * d:(i + 1) * d])
    want_o = sd["c_proj.weight"] if fmt == "conv1d" else sd["c_proj.weight"].T
    np.testing.assert_array_equal(params["o"]["w"], want_o)


def test_bad_layouts_are_reported_together(rng):
    model = serial(L.Dense(4), L.MultiHeadAttention(2), L.LayerNorm())
    with pytest.raises(StateDictError) as e:
        load_state_dict(model, {}, (1, 2, 4), layout={"0": "transposed", "1": {"q": "x"},
                                                      "2": "linear", "9": "linear"})
    msg = str(e.value)
    assert "layout: fnn layer '0' (Dense(4)): a Dense layout is 'linear' or 'conv1d', got " \
           "'transposed'" in msg
    assert "layout: fnn layer '1' (MultiHeadAttention(2)): a MultiHeadAttention layout dict" in msg
    assert "layout: '2' names no fnn layer of the model that reads a layout" in msg
    assert "layout: '9' names no fnn layer" in msg


def test_positional_embedding_class_token_patch_embedding(rng):
    """torchvision ViT's stem: conv_proj, class_token (1, 1, d), encoder.pos_embedding (1, n, d)
    ("parameter" layout); and GPT-2's wpe (nn.Embedding: "embedding", the default)."""
    model = named(serial(("conv_proj", L.PatchEmbedding(2, 6)), ("cls", L.ClassToken()),
                         ("pos", L.PositionalEmbedding(5))),
                  torch_names={"cls": "class_token", "pos": "encoder.pos_embedding"},
                  torch_layout={"cls": "parameter", "pos": "parameter"})
    sd = {"conv_proj.weight": rng.normal(size=(6, 3, 2, 2)), "conv_proj.bias": rng.normal(size=6),
          "class_token": rng.normal(size=(1, 1, 6)),
          "encoder.pos_embedding": rng.normal(size=(1, 5, 6))}
    params, state = load_state_dict(model, sd, (2, 4, 4, 3))
    x = rng.normal(size=(2, 3, 4, 4))                                         # NCHW
    tok = R.conv2d(x, sd["conv_proj.weight"], sd["conv_proj.bias"], stride=2)  # (2, 6, 2, 2)
    tok = tok.reshape(2, 6, 4).transpose(0, 2, 1)
    want = np.concatenate([np.broadcast_to(sd["class_token"], (2, 1, 6)), tok], 1) \
        + sd["encoder.pos_embedding"]
    got = model.apply(params, state, np.moveaxis(x, 1, -1))[0]
    np.testing.assert_allclose(got, want, atol=1e-12)
    wpe = rng.normal(size=(5, 6))
    params, _ = load_state_dict(serial(("wpe", L.PositionalEmbedding(5))), {"wpe.weight": wpe},
                                (1, 3, 6))
    np.testing.assert_array_equal(params["wpe"]["w"], wpe)


def test_stack_names_with_i_templates(rng):
    block = serial(("ln", L.LayerNorm()), ("fc", L.Dense(4)))
    model = named(serial(("blocks", stack(block, 2))),
                  torch_names={"blocks": "encoder.layers.encoder_layer_{i}",
                               "blocks/{i}/fc": "encoder.layers.encoder_layer_{i}.mlp.0"})
    sd = {}
    for i in range(2):
        p = f"encoder.layers.encoder_layer_{i}"
        sd.update({f"{p}.ln.weight": rng.normal(size=4), f"{p}.ln.bias": rng.normal(size=4),
                   f"{p}.mlp.0.weight": rng.normal(size=(4, 4)),
                   f"{p}.mlp.0.bias": rng.normal(size=4)})
    params, _ = load_state_dict(model, sd, (1, 4))
    for i in range(2):
        p = f"encoder.layers.encoder_layer_{i}"
        np.testing.assert_array_equal(params["blocks"]["fc"]["w"][i], sd[f"{p}.mlp.0.weight"].T)
        np.testing.assert_array_equal(params["blocks"]["ln"]["offset"][i], sd[f"{p}.ln.bias"])


def _lm(rng, declared):
    body = serial(("wte", L.Embedding(7, 4)), ("head", L.Dense(7, use_bias=False)))
    if declared:            # a head that reads the embedding itself: only the alias is declared
        model = named(serial(("wte", L.Embedding(7, 4))), torch_names={"wte": "transformer.wte"},
                      torch_tied={"lm_head.weight": "transformer.wte.weight"})
    else:
        model = named(tied(body, "head/w", "wte/w", transpose=True),
                      torch_names={"wte": "transformer.wte", "head": "lm_head"})
    return model, {"transformer.wte.weight": rng.normal(size=(7, 4))}


@pytest.mark.parametrize("declared", [True, False])
def test_tied_alias_may_be_absent_and_must_equal_its_source(rng, declared):
    model, sd = _lm(rng, declared)
    params, _ = load_state_dict(model, sd, (1, 3))
    assert list(params) == ["wte"]
    np.testing.assert_array_equal(params["wte"]["w"], sd["transformer.wte.weight"])
    load_state_dict(model, {**sd, "lm_head.weight": sd["transformer.wte.weight"].copy()}, (1, 3))
    bad = sd["transformer.wte.weight"] + np.eye(7, 4) * 1e-3
    with pytest.raises(StateDictError, match="tied: 'lm_head.weight'"):
        load_state_dict(model, {**sd, "lm_head.weight": bad}, (1, 3))


def test_mistyped_tensors_are_reported_with_the_rest(rng):
    model = serial(L.Dense(3), L.Relu(), L.Embedding(5, 3), L.BatchNorm())
    sd = {"0.weight": rng.integers(0, 3, size=(3, 2)), "0.bias": np.zeros(3, bool),
          "2.weight": rng.normal(size=(5, 4)), "3.weight": rng.normal(size=3),
          "3.bias": rng.normal(size=3), "3.running_mean": rng.normal(size=3),
          "3.num_batches_tracked": np.array(7)}
    with pytest.raises(StateDictError) as e:
        load_state_dict(model, sd, (1, 2))
    msg = str(e.value)
    assert "4 problems" in msg
    assert "dtype: '0.weight' is int64, fnn layer '0' (Dense(3)) needs a floating-point tensor" \
        in msg
    assert "dtype: '0.bias' is bool" in msg
    assert "shape: '2.weight' is (5, 4)" in msg
    assert "missing: '3.running_var' (3,)" in msg


def test_gated_mlp_and_mlp_names_and_layouts(rng):
    model = named(serial(("mlp", L.GatedMLP(6)), ("ff", L.MLP(5))),
                  torch_names={"ff/fc1": "c_fc", "ff/fc2": "c_proj"},
                  torch_layout={"ff": "conv1d"})
    sd = {"mlp.gate_proj.weight": rng.normal(size=(6, 4)),
          "mlp.up_proj.weight": rng.normal(size=(6, 4)),
          "mlp.down_proj.weight": rng.normal(size=(4, 6)), "c_fc.weight": rng.normal(size=(4, 5)),
          "c_fc.bias": rng.normal(size=5), "c_proj.weight": rng.normal(size=(5, 4)),
          "c_proj.bias": rng.normal(size=4)}
    params, _ = load_state_dict(model, sd, (1, 4))
    for n in ("gate", "up", "down"):
        np.testing.assert_array_equal(params["mlp"][n]["w"], sd[f"mlp.{n}_proj.weight"].T)
    np.testing.assert_array_equal(params["ff"]["fc1"]["w"], sd["c_fc.weight"])
    np.testing.assert_array_equal(params["ff"]["fc2"]["w"], sd["c_proj.weight"])
