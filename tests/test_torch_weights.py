"""fnn.torch_weights: PyTorch state_dicts load into fnn models and reproduce PyTorch's outputs.

Every case runs twice: against a NumPy float64 reference written from PyTorch's documented
equations (tests/torch_refs.py; always), and against PyTorch itself (float32, to 1e-5) where
torch is installed (the benchmark extra)."""
from typing import Callable, NamedTuple

import numpy as np
import pytest

import torch_refs as R
from fnn import checkpoint, serial, stack
from fnn import layers as L
from fnn.torch_weights import StateDictError, load_state_dict, read_state_dict


class Case(NamedTuple):
    model: object                 # the fnn model
    shape: tuple                  # the fnn input shape (channels-last)
    sd: dict                      # torch name -> torch shape
    ref: Callable                 # NumPy reference ref(sd, x) on torch layouts
    torch: Callable               # () -> torch module (nn imported lazily)
    x_shape: tuple                # the torch input shape
    nchw: bool = False            # transpose input NCHW -> NHWC (and output back if 4-d)
    ids: int = 0                  # integer inputs below this vocabulary size


def _nn():
    import torch
    return torch.nn


CNN_SD = {"0.weight": (4, 2, 3, 3), "0.bias": (4,), "1.weight": (4,), "1.bias": (4,),
          "1.running_mean": (4,), "1.running_var": (4,), "1.num_batches_tracked": (),
          "4.weight": (6, 2, 3, 3), "4.bias": (6,), "7.weight": (3, 24), "7.bias": (3,)}


def _cnn_ref(sd, x):
    h = R.conv2d(x, sd["0.weight"], sd["0.bias"], padding=1)
    h = np.maximum(R.batch_norm_eval(h, *(sd[f"1.{k}"] for k in
                                          ("weight", "bias", "running_mean", "running_var"))), 0)
    h = np.maximum(R.conv2d(R.max_pool2d(h, 2), sd["4.weight"], sd["4.bias"], groups=2), 0)
    return R.linear(h.reshape(h.shape[0], -1), sd["7.weight"], sd["7.bias"])


def _cnn_torch():
    nn = _nn()
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(24, 3))


def _block_sd(E=8, F=12):
    sd = {"self_attn.in_proj_weight": (3 * E, E), "self_attn.in_proj_bias": (3 * E,),
          "self_attn.out_proj.weight": (E, E), "self_attn.out_proj.bias": (E,),
          "linear1.weight": (F, E), "linear1.bias": (F,), "linear2.weight": (E, F),
          "linear2.bias": (E,)}
    return {**sd, **{f"norm{i}.{k}": (E,) for i in (1, 2) for k in ("weight", "bias")}}


def _block(norm):
    return Case(L.TransformerBlock(2, 12, norm=norm), (2, 5, 8), _block_sd(),
                lambda sd, x: R.encoder_layer(x, sd, 2, norm == "pre"),
                lambda: _nn().TransformerEncoderLayer(8, 2, 12, dropout=0.0, activation="gelu",
                                                      batch_first=True,
                                                      norm_first=norm == "pre"), (2, 5, 8))


CASES = {
    "Dense": Case(L.Dense(3), (4, 5), {"weight": (3, 5), "bias": (3,)},
                  lambda sd, x: R.linear(x, sd["weight"], sd["bias"]),
                  lambda: _nn().Linear(5, 3), (4, 5)),
    "Conv": Case(L.Conv(4, (3, 2), strides=2, padding=1, dilation=(1, 2), groups=2),
                 (2, 7, 8, 6), {"weight": (4, 3, 3, 2), "bias": (4,)},
                 lambda sd, x: R.conv2d(x, sd["weight"], sd["bias"], 2, 1, (1, 2), 2),
                 lambda: _nn().Conv2d(6, 4, (3, 2), 2, 1, (1, 2), 2), (2, 6, 7, 8), nchw=True),
    # PyTorch padding p, output_padding q  ==  explicit (k-1-p, k-1-p+q) (conv_transpose doc)
    "ConvTranspose": Case(L.ConvTranspose(6, (3, 3), strides=2, padding=((1, 2), (1, 2)),
                                          groups=2), (2, 4, 3, 4),
                          {"weight": (4, 3, 3, 3), "bias": (6,)},
                          lambda sd, x: R.conv_transpose2d(x, sd["weight"], sd["bias"], 2, 1, 1, 2),
                          lambda: _nn().ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2),
                          (2, 4, 4, 3), nchw=True),
    "BatchNorm": Case(L.BatchNorm(), (6, 4), {"weight": (4,), "bias": (4,), "running_mean": (4,),
                                              "running_var": (4,), "num_batches_tracked": ()},
                      lambda sd, x: R.batch_norm_eval(x, sd["weight"], sd["bias"],
                                                      sd["running_mean"], sd["running_var"]),
                      lambda: _nn().BatchNorm1d(4), (6, 4)),
    "LayerNorm": Case(L.LayerNorm(), (2, 3, 5), {"weight": (5,), "bias": (5,)},
                      lambda sd, x: R.layer_norm(x, sd["weight"], sd["bias"]),
                      lambda: _nn().LayerNorm(5), (2, 3, 5)),
    "GroupNorm": Case(L.GroupNorm(2), (2, 3, 3, 4), {"weight": (4,), "bias": (4,)},
                      lambda sd, x: R.group_norm(x, 2, sd["weight"], sd["bias"]),
                      lambda: _nn().GroupNorm(2, 4), (2, 4, 3, 3), nchw=True),
    "InstanceNorm": Case(L.InstanceNorm(), (2, 3, 3, 4), {"weight": (4,), "bias": (4,)},
                         lambda sd, x: R.group_norm(x, 4, sd["weight"], sd["bias"]),
                         lambda: _nn().InstanceNorm2d(4, affine=True), (2, 4, 3, 3), nchw=True),
    "RMSNorm": Case(L.RMSNorm(), (2, 3, 5), {"weight": (5,)},
                    lambda sd, x: R.rms_norm(x, sd["weight"], 1e-6),
                    lambda: _nn().RMSNorm(5, eps=1e-6), (2, 3, 5)),
    "SimpleRNN": Case(L.SimpleRNN(3), (2, 4, 5), {"weight_ih_l0": (3, 5), "weight_hh_l0": (3, 3),
                                                  "bias_ih_l0": (3,), "bias_hh_l0": (3,)},
                      lambda sd, x: R.rnn(x, *sd.values()),
                      lambda: _nn().RNN(5, 3, batch_first=True), (2, 4, 5)),
    "Embedding": Case(L.Embedding(7, 3), (2, 4), {"weight": (7, 3)},
                      lambda sd, x: sd["weight"][x], lambda: _nn().Embedding(7, 3), (2, 4), ids=7),
    "LSTM": Case(L.LSTM(3), (2, 4, 5), {"weight_ih_l0": (12, 5), "weight_hh_l0": (12, 3),
                                        "bias_ih_l0": (12,), "bias_hh_l0": (12,)},
                 lambda sd, x: R.lstm(x, *sd.values()),
                 lambda: _nn().LSTM(5, 3, batch_first=True), (2, 4, 5)),
    "GRU": Case(L.GRU(3), (2, 4, 5), {"weight_ih_l0": (9, 5), "weight_hh_l0": (9, 3),
                                      "bias_ih_l0": (9,), "bias_hh_l0": (9,)},
                lambda sd, x: R.gru(x, *sd.values()),
                lambda: _nn().GRU(5, 3, batch_first=True), (2, 4, 5)),
    "BidirectionalGRU": Case(
        L.Bidirectional(L.GRU(3)), (2, 4, 5),
        {f"{w}{s}": (9, 5 if w == "weight_ih_l0" else 3) if w.startswith("weight") else (9,)
         for s in ("", "_reverse")
         for w in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")},
        lambda sd, x: np.concatenate([R.gru(x, *list(sd.values())[:4]),
                                      R.gru(x, *list(sd.values())[4:], reverse=True)], -1),
        lambda: _nn().GRU(5, 3, batch_first=True, bidirectional=True), (2, 4, 5)),
    "MultiHeadAttention": Case(
        L.MultiHeadAttention(2), (2, 5, 8),
        {"in_proj_weight": (24, 8), "in_proj_bias": (24,), "out_proj.weight": (8, 8),
         "out_proj.bias": (8,)},
        lambda sd, x: R.mha(x, sd, 2),
        lambda: _nn().MultiheadAttention(8, 2, batch_first=True), (2, 5, 8)),
    "CNN": Case(serial(L.Conv(4, (3, 3), padding=1), L.BatchNorm(), L.Relu(), L.MaxPool((2, 2)),
                       L.Conv(6, (3, 3), padding="VALID", groups=2), L.Relu(), L.Flatten(),
                       L.Dense(3)), (2, 8, 8, 2), CNN_SD, _cnn_ref, _cnn_torch, (2, 2, 8, 8),
                nchw=True),
    "TransformerBlock-pre": _block("pre"),
    "TransformerBlock-post": _block("post"),
}


def _random_sd(case, rng):
    sd = {k: rng.normal(size=s) for k, s in case.sd.items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 2.0, size=sd[k].shape)
    return sd


def _input(case, rng):
    if case.ids:
        return rng.integers(0, case.ids, size=case.x_shape)
    return rng.normal(size=case.x_shape)


def _run_fnn(case, sd, x, dtype=None):
    params, state = load_state_dict(case.model, sd, case.shape, dtype=dtype)
    xf = np.moveaxis(x, 1, -1) if case.nchw else x
    y, _ = case.model.apply(params, state, xf)
    y = np.asarray(y)
    return np.moveaxis(y, -1, 1) if case.nchw and y.ndim == 4 else y


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name, rng):
    case = CASES[name]
    sd, x = _random_sd(case, rng), _input(case, rng)
    want = case.ref(sd, x)
    got = _run_fnn(case, sd, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_pytorch(name, rng):
    torch = pytest.importorskip("torch")
    case = CASES[name]
    torch.manual_seed(0)
    module = case.torch().eval()
    with torch.no_grad():
        for k, v in module.state_dict().items():          # move running stats off 0/1
            if k.endswith("running_mean") or k.endswith("running_var"):
                v.copy_(torch.rand(v.shape) + 0.5)
        x = _input(case, rng)
        xt = torch.from_numpy(x if case.ids else x.astype(np.float32))
        want = module(xt, xt, xt, need_weights=False)[0] if name == "MultiHeadAttention" \
            else module(xt)
        want = (want[0] if isinstance(want, tuple) else want).numpy()
    got = _run_fnn(case, module.state_dict(), x if case.ids else x.astype(np.float32),
                   np.float32)                             # float32 as PyTorch
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert set(module.state_dict()) == set(case.sd)       # the NumPy cases use torch's names


def test_torch_save_file(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.Linear(5, 3)
    torch.save(module.state_dict(), tmp_path / "w.pt")
    sd = read_state_dict(tmp_path / "w.pt")
    params, _ = load_state_dict(L.Dense(3), sd, (1, 5))
    np.testing.assert_array_equal(params["w"], module.weight.detach().numpy().T)


def test_safetensors_file_without_torch(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy")
    sd = {"0.weight": rng.normal(size=(4, 5)).astype(np.float32),
          "0.bias": rng.normal(size=4).astype(np.float32),
          "2.weight": rng.normal(size=(3, 4)).astype(np.float32)}
    st.save_file(sd, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    got = read_state_dict(tmp_path / "w.safetensors")
    assert set(got) == set(sd) and all(np.array_equal(got[k], sd[k]) for k in sd)
    model = serial(L.Dense(4), L.Relu(), L.Dense(3, use_bias=False))
    params, _ = load_state_dict(model, got, (1, 5))
    np.testing.assert_array_equal(params["2"]["w"], sd["2.weight"].T)


def test_hostile_safetensors_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(checkpoint.CheckpointError, match="bad.safetensors: truncated"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_missing_extra_and_misshaped_tensors_are_all_named(rng):
    model = serial(L.Dense(4), L.Relu(), L.Dense(3))
    sd = {"0.weight": rng.normal(size=(4, 6)), "0.bias": rng.normal(size=4),
          "2.weight": rng.normal(size=(3, 4)), "3.weight": rng.normal(size=(2, 2))}
    with pytest.raises(StateDictError) as e:
        load_state_dict(model, sd, (1, 5))
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing: '2.bias' (3,) for fnn layer '2' (Dense(3))" in msg
    assert "shape: '0.weight' is (4, 6), fnn layer '0' (Dense(4)) needs (4, 5)" in msg
    assert "unexpected: '3.weight' (2, 2) is not used by the model" in msg


def test_mapping_renames_and_unused_mapping_is_an_error(rng):
    model = serial(("encoder", L.Dense(4)), L.Relu(), ("head", L.Dense(3)))
    sd = {"features.0.weight": rng.normal(size=(4, 5)), "features.0.bias": rng.normal(size=4),
          "fc.weight": rng.normal(size=(3, 4)), "fc.bias": rng.normal(size=3)}
    mapping = {"encoder": "features.0", "head": "fc"}
    params, _ = load_state_dict(model, sd, (1, 5), mapping=mapping)
    np.testing.assert_array_equal(params["head"]["w"], sd["fc.weight"].T)
    with pytest.raises(StateDictError, match="mapping: 'decoder' names no fnn layer"):
        load_state_dict(model, sd, (1, 5), mapping={**mapping, "decoder": "x"})


def test_stack_reads_numbered_copies(rng):
    model = stack(L.TransformerBlock(2, 12, norm="post"), 2)
    sd = {f"layers.{i}.{k}": rng.normal(size=s) for i in range(2) for k, s in _block_sd().items()}
    x = rng.normal(size=(2, 5, 8))
    params, state = load_state_dict(model, sd, x.shape, mapping={"": "layers"})
    want = x
    for i in range(2):
        want = R.encoder_layer(want, {k[9:]: v for k, v in sd.items()
                                      if k.startswith(f"layers.{i}.")}, 2, False)
    np.testing.assert_allclose(model.apply(params, state, x)[0], want, atol=1e-9)


def test_layer_without_correspondence_is_named():
    model = serial(L.WeightNorm(L.ConvTranspose(3, (2, 2))))   # torch's dim=0 is its input
    with pytest.raises(StateDictError, match=r"unsupported: fnn layer '0' \(WeightNorm"):
        load_state_dict(model, {}, (1, 4, 4, 2))


def test_torch_save_needs_torch_only_to_read(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch":
            raise ImportError("no torch")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ImportError, match="w.pt is a torch.save file.*needs PyTorch"):
        read_state_dict(tmp_path / "w.pt")


def test_cross_attention_with_kdim_reads_separate_projections(rng):
    shapes = {"q_proj_weight": (8, 8), "k_proj_weight": (8, 6), "v_proj_weight": (8, 6),
              "in_proj_bias": (24,), "out_proj.weight": (8, 8), "out_proj.bias": (8,)}
    sd = {k: rng.normal(size=s) for k, s in shapes.items()}
    x, ctx = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 4, 6))
    model = L.MultiHeadAttention(2)
    params, state = load_state_dict(model, sd, (x.shape, ctx.shape))
    np.testing.assert_allclose(model.apply(params, state, (x, ctx))[0],
                               R.mha_cross(x, ctx, sd, 2), atol=1e-9)
    try:
        import torch
    except ImportError:
        return
    m = torch.nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True).eval()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    xt, ct = (torch.from_numpy(a.astype(np.float32)) for a in (x, ctx))
    with torch.no_grad():
        want = m(xt, ct, ct, need_weights=False)[0].numpy()
    params, state = load_state_dict(model, m.state_dict(), (x.shape, ctx.shape), dtype=np.float32)
    got = model.apply(params, state, (xt.numpy(), ct.numpy()))[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_multi_layer_lstm_by_mapping(rng):
    shapes = {f"lstm.{w}_l{k}": s for k in (0, 1) for w, s in
              (("weight_ih", (12, 5 if k == 0 else 3)), ("weight_hh", (12, 3)), ("bias_ih", (12,)),
               ("bias_hh", (12,)))}
    sd = {k: rng.normal(size=s) for k, s in shapes.items()}
    model, x = serial(L.LSTM(3), L.LSTM(3)), rng.normal(size=(2, 4, 5))
    mapping = {"0": "lstm[0]", "1": "lstm[1]"}
    params, state = load_state_dict(model, sd, x.shape, mapping=mapping)
    layer = lambda h, k: R.lstm(h, *(sd[f"lstm.{w}_l{k}"] for w in
                                     ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    np.testing.assert_allclose(model.apply(params, state, x)[0], layer(layer(x, 0), 1), atol=1e-9)
    with pytest.raises(StateDictError, match=r"mapping: 'fc\[1\]' selects a layer of a multi"):
        load_state_dict(serial(L.Dense(3)), {}, (1, 4), mapping={"0": "fc[1]"})
    try:
        import torch
    except ImportError:
        return
    m = torch.nn.Module()
    m.lstm = torch.nn.LSTM(5, 3, num_layers=2, batch_first=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    with torch.no_grad():
        want = m.lstm(torch.from_numpy(x.astype(np.float32)))[0].numpy()
    params, state = load_state_dict(model, m.state_dict(), x.shape, mapping=mapping,
                                    dtype=np.float32)
    got = model.apply(params, state, x.astype(np.float32))[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_torch_save_checkpoint_dict_is_unwrapped(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.Linear(5, 3)
    torch.save({"state_dict": module.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    sd = read_state_dict(tmp_path / "ckpt.pth")
    assert set(sd) == {"weight", "bias"}
    np.testing.assert_array_equal(sd["bias"], module.bias.detach().numpy())


def test_conv_padding_that_differs_from_pytorch_is_named(rng):
    """A PyTorch ``Conv2d(3, 4, 3)`` (padding=0) read into fnn's ``Conv`` (default SAME): the
    weights fit, the ``Linear`` after the ``Flatten`` does not; the error names the Conv, its
    padding and both output shapes, and the VALID model loads the same state_dict."""
    sd = {"0.weight": rng.normal(size=(4, 3, 3, 3)), "0.bias": rng.normal(size=4),
          "3.weight": rng.normal(size=(2, 4 * 4 * 4)), "3.bias": rng.normal(size=2)}
    same = serial(L.Conv(4, (3, 3)), L.Relu(), L.Flatten(), L.Dense(2))
    with pytest.raises(StateDictError) as e:
        load_state_dict(same, sd, (1, 6, 6, 3))
    msg = str(e.value)
    assert "1 problems" in msg and "shape: '3.weight' is (2, 64)" in msg
    assert ("hint: Conv '0' (Conv(4, (3, 3))) uses padding 'SAME': (1, 6, 6, 3) -> (1, 6, 6, 4); "
            "PyTorch's Conv2d defaults to padding=0 (VALID): -> (1, 4, 4, 4)") in msg
    assert "padding='VALID'" in msg
    valid = serial(L.Conv(4, (3, 3), padding="VALID"), L.Relu(), L.Flatten(), L.Dense(2))
    params, _ = load_state_dict(valid, sd, (1, 6, 6, 3))
    assert params["0"]["w"].shape == (3, 3, 3, 4)
    sd["3.weight"] = rng.normal(size=(2, 5))                    # a genuine mismatch: no hint
    with pytest.raises(StateDictError) as e:
        load_state_dict(valid, sd, (1, 6, 6, 3))
    assert "hint" not in str(e.value)
