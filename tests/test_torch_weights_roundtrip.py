"""fnn.torch_weights.state_dict is the exact inverse of load_state_dict, for every converter and
layout: fnn → PyTorch → fnn and PyTorch → fnn → PyTorch give back the same bits (a recurrent
layer's two biases come back as their sum and zero; a BatchNorm's num_batches_tracked as 0).
Where torch is installed, the saved state_dict loads into the PyTorch module (strict) and that
module computes what the fnn model computes."""
import jax
import numpy as np
import pytest

from test_torch_weights import CASES, _input, _random_sd
from fnn import serial, stack, tied
from fnn import layers as L
from fnn.torch_weights import StateDictError, load_state_dict, state_dict


def named(layer, **meta):
    return layer._replace(meta={**layer.meta, **meta})


def _mha(layout, **kw):
    return named(L.MultiHeadAttention(2, **kw), torch_layout={"": layout})


LLAMA = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
BERT = {"q": "self.query", "k": "self.key", "v": "self.value", "o": "output.dense"}
LAYOUTS = {     # name: (model, input shape)
    "Dense-conv1d": (named(L.Dense(4), torch_layout={"": "conv1d"}), (1, 4)),
    "Flatten-Dense-conv1d": (named(serial(L.Flatten(), L.Dense(3)), torch_layout={"1": "conv1d"}),
                             (1, 2, 3, 4)),
    "attn-llama-gqa": (_mha(LLAMA, num_kv_heads=1, use_bias=False), (1, 3, 8)),
    "attn-bert": (_mha(BERT), (1, 3, 8)),
    "attn-gpt2-c_attn": (_mha({"qkv": "c_attn", "o": "c_proj", "format": "conv1d"}), (1, 3, 8)),
    "attn-fused-linear-gqa": (_mha({"qkv": "qkv", "o": "proj"}, num_kv_heads=1), (1, 3, 8)),
    "attn-cross-kdim": (L.MultiHeadAttention(2), ((1, 3, 8), (1, 4, 6))),
    "pos-embedding": (L.PositionalEmbedding(5), (1, 3, 4)),
    "pos-parameter": (named(L.PositionalEmbedding(5), torch_layout={"": "parameter"}), (1, 3, 4)),
    "class-token": (L.ClassToken(), (1, 3, 4)),
    "class-token-parameter": (named(serial(("cls", L.ClassToken())),
                                    torch_names={"cls": "class_token"},
                                    torch_layout={"cls": "parameter"}), (1, 3, 4)),
    "patch": (L.PatchEmbedding(2, 5), (1, 4, 4, 3)),
    "gated-mlp": (L.GatedMLP(6, use_bias=True), (1, 4)),
    "mlp-conv1d": (named(L.MLP(6), torch_layout={"": "conv1d"}), (1, 4)),
    "prelu": (L.PRelu(), (1, 4)),
    "lstm-stack-2": (serial(L.LSTM(3), L.LSTM(3)), (1, 2, 4)),
    "stack-i": (named(serial(("h", stack(serial(("ln", L.LayerNorm()), ("fc", L.Dense(4))), 2))),
                      torch_names={"h": "layers.layer_{i}"}), (1, 4)),
    "tied": (named(tied(serial(("wte", L.Embedding(7, 4)), ("head", L.Dense(7, use_bias=False))),
                        "head/w", "wte/w", transpose=True), torch_names={"head": "lm_head"}),
             (1, 3)),
    "torch_tied": (named(serial(("wte", L.Embedding(7, 4))),
                         torch_tied={"head.weight": "wte.weight"}), (1, 3)),
}
MODELS = {**{k: (c.model, c.shape) for k, c in CASES.items()}, **LAYOUTS}
MAPPINGS = {"lstm-stack-2": {"0": "lstm[0]", "1": "lstm[1]"}}


def _random_tree(template, rng):
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), template)


def _random_params(model, shape, rng):
    pt, st = jax.eval_shape(lambda k: model.init(k, shape)[:2], jax.random.PRNGKey(0))
    return _random_tree(pt, rng), _random_tree(st, rng)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", list(MODELS))
def test_fnn_to_torch_to_fnn_is_exact(name, rng):
    model, shape = MODELS[name]
    mapping = MAPPINGS.get(name)
    params, state = _random_params(model, shape, rng)
    sd = state_dict(model, params, state, shape, mapping=mapping)
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in sd.values())
    back = load_state_dict(model, sd, shape, mapping=mapping)
    _assert_trees_equal(back, (params, state))
    sd32 = state_dict(model, params, state, shape, mapping=mapping, dtype=np.float32)
    assert {v.dtype for k, v in sd32.items() if not k.endswith("num_batches_tracked")} \
        == {np.dtype(np.float32)}
    p32 = load_state_dict(model, sd32, shape, mapping=mapping, dtype=np.float32)[0]
    _assert_trees_equal(p32, jax.tree.map(lambda a: a.astype(np.float32), params))


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_to_fnn_to_torch_is_exact(name, rng):
    model, shape = MODELS[name]
    mapping = MAPPINGS.get(name)
    keys = state_dict(model, *_random_params(model, shape, rng), shape, mapping=mapping)
    sd = {k: rng.normal(size=v.shape).astype(np.float32) if v.dtype.kind == "f" else v
          for k, v in keys.items()}
    for alias, source in (("lm_head.weight", "wte.weight"), ("head.weight", "wte.weight")):
        if alias in sd:
            sd[alias] = sd[source].copy()
    back = state_dict(model, *load_state_dict(model, sd, shape, mapping=mapping,
                                              dtype=np.float32), shape, mapping=mapping)
    assert set(back) == set(sd)
    for k, v in sd.items():
        if "bias_hh" in k and "b" in _leaf_names(model, shape):        # LSTM/SimpleRNN: one b
            ih = k.replace("bias_hh", "bias_ih")
            np.testing.assert_array_equal(back[k], np.zeros_like(v))
            np.testing.assert_array_equal(back[ih], np.float32(v.astype(np.float64)
                                                               + sd[ih].astype(np.float64)))
        elif "bias_ih" not in k or "b" not in _leaf_names(model, shape):
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            np.testing.assert_array_equal(back[k], v)


def _leaf_names(model, shape):
    pt = jax.eval_shape(lambda k: model.init(k, shape)[0], jax.random.PRNGKey(0))
    return {getattr(p[-1], "key", None) for p, _ in jax.tree_util.tree_flatten_with_path(pt)[0]}


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_reference_cases_round_trip_from_torch(name, rng):
    """The hand-written PyTorch key sets of test_torch_weights: the saved key set is PyTorch's."""
    case = CASES[name]
    sd = _random_sd(case, rng)
    sd = {k: (np.array(3, np.int64) if k.endswith("num_batches_tracked") else v)
          for k, v in sd.items()}
    back = state_dict(case.model, *load_state_dict(case.model, sd, case.shape), case.shape)
    assert {k: v.shape for k, v in back.items()} == {k: np.shape(v) for k, v in sd.items()}
    for k, v in back.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == np.int64 and v == 0
        elif name not in ("SimpleRNN", "LSTM") or "bias" not in k:
            np.testing.assert_array_equal(v, sd[k])


def test_params_that_do_not_fit_are_named(rng):
    model = serial(L.Dense(3), L.Relu(), L.Dense(2))
    params, state = _random_params(model, (1, 4), rng)
    params["2"]["w"] = np.zeros((3, 5))
    del params["0"]["b"]
    with pytest.raises(StateDictError) as e:
        state_dict(model, params, state, (1, 4))
    assert "0/b: given nothing, serial has (3,)" in str(e.value)
    assert "2/w: given (3, 5), serial has (3, 2)" in str(e.value)


def test_two_layers_with_one_name_is_an_error(rng):
    model = named(serial(("a", L.Dense(3)), ("b", L.Dense(3))), torch_names={"a": "fc", "b": "fc"})
    with pytest.raises(StateDictError, match="duplicate: fnn layer 'b' .* writes 'fc.weight'"):
        state_dict(model, *_random_params(model, (1, 3), rng), (1, 3))


@pytest.mark.parametrize("name", list(CASES))
def test_saved_state_dict_runs_in_pytorch(name, rng):
    torch = pytest.importorskip("torch")
    case = CASES[name]
    params, state = _random_params(case.model, case.shape, rng)
    if name in ("BatchNorm", "CNN"):                    # running variance must be positive
        state = jax.tree.map(lambda a: np.abs(a) + 0.5, state)
    sd = state_dict(case.model, params, state, case.shape, dtype=np.float32)
    module = case.torch().eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = _input(case, rng)
    xt = torch.from_numpy(x if case.ids else x.astype(np.float32))
    with torch.no_grad():
        want = module(xt, xt, xt, need_weights=False)[0] if name == "MultiHeadAttention" \
            else module(xt)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    xf = np.moveaxis(x, 1, -1) if case.nchw else x
    got = np.asarray(case.model.apply(params, state, xf)[0])
    got = np.moveaxis(got, -1, 1) if case.nchw and got.ndim == 4 else got
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_linear_sequential_round_trip_through_torch(rng):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model = serial(L.Dense(4), L.Relu(), L.Dense(3))
    params, state = load_state_dict(model, module.state_dict(), (1, 5), dtype=np.float32)
    sd = state_dict(model, params, state, (1, 5))
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(sd[k], v.numpy())
    other = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    other.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = torch.from_numpy(rng.normal(size=(2, 5)).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_array_equal(other(x).numpy(), module(x).numpy())


def _layer_examples():
    for name in L.__all__:
        for i, ex in enumerate(getattr(getattr(L, name), "examples", ())):
            yield pytest.param(name, ex, id=f"{name}-{i}")


@pytest.mark.parametrize("name,ex", list(_layer_examples()))
def test_every_layer_with_parameters_round_trips(name, ex, rng):
    """The layer sweep's examples: each layer with parameters saves and loads back exactly."""
    layer = getattr(L, name)(*ex.args, **ex.kwargs)
    params, state = _random_params(layer, ex.input_shape, rng)
    if not jax.tree.leaves((params, state)):
        return
    sd = state_dict(layer, params, state, ex.input_shape)
    if name in ("SimpleRNN", "LSTM", "GRU"):          # a stateful layer's carry: not a weight
        state = jax.tree.map(np.zeros_like, state)
    _assert_trees_equal(load_state_dict(layer, sd, ex.input_shape), (params, state))
