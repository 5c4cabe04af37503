"""fnn.models.ResNet: the forward against a float64 NumPy reference of the published equations
(NCHW, PyTorch-layout weights), the hand backward against jax.grad (train and eval), loading a
state_dict with torchvision's key names and layouts (key set written out from torchvision's
module structure), and, where torch and torchvision import, torchvision itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import backprop, losses
from fnn.models import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from fnn.torch_weights import StateDictError, load_state_dict

from helpers import no_autodiff, tree_rel_err

EPS = 1e-5
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
loss = losses.softmax_cross_entropy_with_integer_labels


def tiny(block="basic"):
    return ResNet(block, (1, 1, 1, 1), num_classes=5, width=8)


def random_weights(model, shape, seed=0):
    """``init``'s params and state, every batch norm given a non-trivial scale, offset and
    running statistics (mean ~ N(0, 0.5²), var ~ U(0.5, 2))."""
    params, state, _ = model.init(jax.random.PRNGKey(seed), shape)
    rng = np.random.default_rng(seed)

    def bn(tree, draw):
        if isinstance(tree, dict) and set(tree) in ({"scale", "offset"}, {"mean", "var"}):
            return {k: jnp.asarray(draw(k, tree[k].shape)) for k in tree}
        if isinstance(tree, dict):
            return {k: bn(v, draw) for k, v in tree.items()}
        return tree
    p_draw = lambda k, s: rng.normal(1.0 if k == "scale" else 0.0, 0.3, s)
    s_draw = lambda k, s: rng.normal(0, 0.5, s) if k == "mean" else rng.uniform(0.5, 2, s)
    return bn(params, p_draw), bn(state, s_draw)


def to_torch(params, state):
    """A torchvision ``state_dict`` from fnn params by the inverse layouts: conv HWIO → OIHW,
    Dense (in, out) → (out, in), batch norm scale/offset/mean/var → weight/bias/running_*;
    the containers ``residual`` and ``main`` add no level."""
    sd = {}
    flat = jax.tree_util.tree_flatten_with_path({"p": params, "s": state})[0]
    names = {"scale": "weight", "offset": "bias", "mean": "running_mean", "var": "running_var",
             "b": "bias"}
    for kp, leaf in flat:
        keys = [k.key for k in kp]
        mod = ".".join(k for k in keys[1:-1] if k not in ("residual", "main"))
        a, last = np.asarray(leaf), keys[-1]
        if last == "w":
            sd[f"{mod}.weight"] = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
        else:
            sd[f"{mod}.{names[last]}"] = a
        if last == "mean":
            sd[f"{mod}.num_batches_tracked"] = np.asarray(0)
    return sd


def expected_keys(block, layers):
    """torchvision.models.ResNet's state_dict keys, from its published module structure:
    conv1, bn1, layer1..4 of blocks (conv1, bn1, conv2, bn2[, conv3, bn3][, downsample.0 conv,
    downsample.1 bn]), fc. The first block of layer2..4 has the downsample; for bottleneck
    blocks layer1's first block too."""
    bns = lambda m: [f"{m}.{k}" for k in BN_KEYS]
    keys = ["conv1.weight", *bns("bn1"), "fc.weight", "fc.bias"]
    n_conv = 2 if block == "basic" else 3
    for k, n in enumerate(layers, start=1):
        for i in range(n):
            b = f"layer{k}.{i}"
            for j in range(1, n_conv + 1):
                keys += [f"{b}.conv{j}.weight", *bns(f"{b}.bn{j}")]
            if i == 0 and (k > 1 or block == "bottleneck"):
                keys += [f"{b}.downsample.0.weight", *bns(f"{b}.downsample.1")]
    return keys


# --------------------------------------------------------------------------- NumPy reference

def conv_nchw(x, w, stride, pad):
    """``y[b, o, i, j] = Σ_{c, u, v} w[o, c, u, v] · xpad[b, c, s·i + u, s·j + v]``."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    o, c, kh, kw = w.shape
    h = (x.shape[2] - kh) // stride + 1
    wd = (x.shape[3] - kw) // stride + 1
    y = np.zeros((x.shape[0], o, h, wd))
    for u in range(kh):
        for v in range(kw):
            patch = x[:, :, u:u + stride * h:stride, v:v + stride * wd:stride]
            y += np.einsum("bchw,oc->bohw", patch, w[:, :, u, v])
    return y


def bn_eval(x, sd, m):
    r = lambda k: sd[f"{m}.{k}"][None, :, None, None]
    return (x - r("running_mean")) / np.sqrt(r("running_var") + EPS) * r("weight") + r("bias")


def maxpool_3x3_s2_p1(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    return np.max([x[:, :, u:u + 2 * h:2, v:v + 2 * w:2] for u in range(3) for v in range(3)],
                  axis=0)


def reference(sd, x_nhwc, block, layers):
    """He et al.'s ResNet (torchvision v1.5) in NumPy, NCHW, from the torch-layout weights."""
    relu = lambda z: np.maximum(z, 0)
    x = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
    x = maxpool_3x3_s2_p1(relu(bn_eval(conv_nchw(x, sd["conv1.weight"], 2, 3), sd, "bn1")))
    for k, n in enumerate(layers, start=1):
        for i in range(n):
            b, s = f"layer{k}.{i}", (2 if k > 1 and i == 0 else 1)
            if block == "basic":
                f = relu(bn_eval(conv_nchw(x, sd[f"{b}.conv1.weight"], s, 1), sd, f"{b}.bn1"))
                f = bn_eval(conv_nchw(f, sd[f"{b}.conv2.weight"], 1, 1), sd, f"{b}.bn2")
            else:
                f = relu(bn_eval(conv_nchw(x, sd[f"{b}.conv1.weight"], 1, 0), sd, f"{b}.bn1"))
                f = relu(bn_eval(conv_nchw(f, sd[f"{b}.conv2.weight"], s, 1), sd, f"{b}.bn2"))
                f = bn_eval(conv_nchw(f, sd[f"{b}.conv3.weight"], 1, 0), sd, f"{b}.bn3")
            short = x
            if f"{b}.downsample.0.weight" in sd:
                short = bn_eval(conv_nchw(x, sd[f"{b}.downsample.0.weight"], s, 0), sd,
                                f"{b}.downsample.1")
            x = relu(f + short)
    pooled = x.mean(axis=(2, 3))
    return pooled @ sd["fc.weight"].T + sd["fc.bias"]


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_forward_equals_numpy_reference(block):
    model = tiny(block)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    params, state = random_weights(model, x.shape)
    y, new_state = jax.jit(model.apply)(params, state, x)        # one compilation, not per op
    want = reference(to_torch(params, state), np.asarray(x), block, (1, 1, 1, 1))
    assert y.shape == (2, 5) and y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-11, atol=1e-11)
    assert tree_rel_err(new_state, state) == 0                  # eval: statistics unchanged


@pytest.mark.parametrize("block,train", [("basic", True), ("basic", False),
                                         ("bottleneck", True)])
def test_hand_backward_equals_autodiff(block, train, monkeypatch):
    model = tiny(block)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    labels = jnp.array([1, 3])
    params, state = random_weights(model, x.shape, seed=3)
    real_grad = jax.value_and_grad

    def auto(p):
        def f(p):
            y, s = model.apply(p, state, x, train=train)
            return loss(y, labels), s
        return real_grad(f, has_aux=True)(p)

    (want_loss, want_state), want = jax.jit(auto)(params)
    step = backprop.value_and_grad(model, loss)
    with no_autodiff(monkeypatch):
        (got_loss, got_state), got = jax.jit(lambda p: step(p, state, x, labels,
                                                            train=train))(params)
    assert abs(float(got_loss) - float(want_loss)) < 1e-12
    assert jax.tree.structure(got) == jax.tree.structure(params)
    assert tree_rel_err(got, want) < 1e-9
    assert tree_rel_err(got_state, want_state) < 1e-12
    moved = tree_rel_err(got_state, state)
    assert (moved > 1e-3) if train else moved == 0       # train updates the running statistics


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_load_torchvision_state_dict_round_trip(block):
    model = tiny(block)
    shape = (1, 32, 32, 3)
    params, state = random_weights(model, shape, seed=4)
    sd = to_torch(params, state)
    assert sorted(sd) == sorted(expected_keys(block, (1, 1, 1, 1)))
    e = 1 if block == "basic" else 4                                            # expansion
    assert sd["layer2.0.conv2.weight"].shape == (16, 16, 3, 3)                  # OIHW
    assert sd["layer2.0.conv1.weight"].shape == ((16, 8, 3, 3) if e == 1 else (16, 32, 1, 1))
    assert sd["layer2.0.downsample.0.weight"].shape == (16 * e, 8 * e, 1, 1)
    assert sd["fc.weight"].shape == (5, 8 * 8 * (1 if block == "basic" else 4))  # (out, in)
    got_p, got_s = load_state_dict(model, sd, shape)
    for got, want in ((got_p, params), (got_s, state)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resnet18_and_50_read_torchvisions_full_key_sets():
    """The full-size models: every torchvision key and no other (shapes from the abstract init,
    nothing computed); resnet18 has 62 tensors of parameters and 122 state_dict entries."""
    for model, block, layers, n in ((resnet18(10), "basic", (2, 2, 2, 2), 122),
                                    (resnet50(10), "bottleneck", (3, 4, 6, 3), 320)):
        p, s = jax.eval_shape(lambda k: model.init(k, (1, 64, 64, 3))[:2],
                              jax.random.PRNGKey(0))
        sd = to_torch(jax.tree.map(lambda a: np.zeros(a.shape), p),
                      jax.tree.map(lambda a: np.zeros(a.shape), s))
        assert sorted(sd) == sorted(expected_keys(block, layers)) and len(sd) == n
        if block == "basic":
            assert len([k for k in sd if not k.endswith(("running_mean", "running_var",
                                                         "num_batches_tracked"))]) == 62
            assert sd["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)
            assert sd["fc.weight"].shape == (10, 512)
        else:
            assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
            assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
            assert sd["fc.weight"].shape == (10, 2048)
        load_state_dict(model, sd, (1, 64, 64, 3))                 # fits: no StateDictError


def test_load_reports_every_problem_at_torchvisions_names():
    model = tiny()
    params, state = random_weights(model, (1, 32, 32, 3))
    sd = to_torch(params, state)
    del sd["layer2.0.downsample.1.running_var"]
    sd["layer3.0.conv2.weight"] = sd["layer3.0.conv2.weight"][:, :-1]
    sd["layer1.0.downsample.0.weight"] = np.zeros((8, 8, 1, 1))    # basic layer1: none
    with pytest.raises(StateDictError) as e:
        load_state_dict(model, sd, (1, 32, 32, 3))
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing: 'layer2.0.downsample.1.running_var' (16,)" in msg
    assert "shape: 'layer3.0.conv2.weight' is (32, 31, 3, 3)" in msg and "(32, 32, 3, 3)" in msg
    assert "unexpected: 'layer1.0.downsample.0.weight'" in msg


def test_structure_names_and_identity():
    model = tiny()
    assert model.kind == "ResNet" and model == tiny() and hash(model) == hash(tiny())
    assert model != tiny("bottleneck")
    assert [n for n, _ in model.children] == ["conv1", "bn1", "relu", "maxpool", "layer1",
                                              "layer2", "layer3", "layer4", "avgpool", "fc"]
    blk = dict(dict(model.children)["layer2"].children)["0"]
    assert blk.kind == "BasicBlock" and blk == BasicBlock(16, 2, True)
    assert Bottleneck(4).kind == "Bottleneck"
    params, _, out = model.init(jax.random.PRNGKey(0), (2, 32, 32, 3))
    assert out == (2, 5)
    assert set(params["layer2"]["0"]["residual"]) == {"main", "downsample"}
    assert set(params["layer1"]["0"]["residual"]) == {"conv1", "bn1", "relu", "conv2", "bn2"}
    assert "b" not in params["conv1"] and params["conv1"]["w"].shape == (7, 7, 3, 8)


@pytest.mark.parametrize("kwargs,msg", [
    ({"block": "wide"}, "block must be 'basic' or 'bottleneck'"),
    ({"layers": (2, 2, 2)}, "layers must be four ints"),
    ({"layers": (2, 0, 2, 2)}, "layers[1] must be a positive int"),
    ({"width": 0}, "width must be a positive int"),
])
def test_bad_arguments_name_the_argument(kwargs, msg):
    with pytest.raises(ValueError, match="ResNet: " + msg.replace("[", r"\[").replace("]", r"\]")):
        ResNet(**kwargs)


def test_matches_torchvision():
    """torchvision's ResNet (width 64 is fixed there) with random weights and non-trivial running
    statistics, float64, eval mode: logits within 1e-9 and the hand gradient of the mean
    cross-entropy within 1e-8 of torch autograd's."""
    torch = pytest.importorskip("torch")
    try:
        tv = pytest.importorskip("torchvision")
    except RuntimeError as e:    # a CUDA torchvision wheel beside CPU torch: its ops do not load
        pytest.skip(f"torchvision does not import: {type(e).__name__}: {e}")
    for block, tv_block in (("basic", tv.models.resnet.BasicBlock),
                            ("bottleneck", tv.models.resnet.Bottleneck)):
        torch.manual_seed(0)
        ref = tv.models.ResNet(tv_block, [1, 1, 1, 1], num_classes=7).double()
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.normal_(1, 0.3), m.bias.normal_(0, 0.3)
                    m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2)
        ref.eval()
        sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        model = ResNet(block, (1, 1, 1, 1), num_classes=7, width=64)
        params, state = load_state_dict(model, sd, (1, 32, 32, 3))
        x = np.random.default_rng(0).normal(size=(2, 3, 32, 32))
        labels = np.array([1, 5])
        xt = torch.tensor(x, requires_grad=False)
        logits_t = ref(xt)
        torch.nn.functional.cross_entropy(logits_t, torch.tensor(labels)).backward()
        xf = jnp.asarray(x.transpose(0, 2, 3, 1))
        logits = model.apply(params, state, xf)[0]
        np.testing.assert_allclose(np.asarray(logits), logits_t.detach().numpy(), atol=1e-9,
                                   rtol=0)
        _, grads = backprop.value_and_grad(model, loss)(params, state, xf, jnp.asarray(labels),
                                                        train=False)
        tgrad = {k: p.grad.numpy() for k, p in ref.named_parameters()}
        mine = to_torch(grads, jax.tree.map(jnp.zeros_like, state))
        assert max(np.max(np.abs(mine[k] - g)) for k, g in tgrad.items()) < 1e-8
