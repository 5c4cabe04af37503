"""fnn.models.VisionTransformer: the forward against a float64 NumPy reference of the published
equations written on PyTorch's layout (NCHW images, OIHW patch kernel, torchvision's token order),
with and without ``representation_size``; the hand backward against jax.vjp (eval and train,
w.r.t. params and image); checks and the presets' sizes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.core import count_params
from fnn.models import VisionTransformer, vit_b_16, vit_l_32

from helpers import assert_trees_close, no_autodiff, tree_scale

ERF = np.vectorize(math.erf)
CFG = dict(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
           num_classes=5)
SHAPE = (2, 8, 8, 3)


def randomized(params, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, a):
        last = path[-1].key
        return jnp.asarray(rng.normal(1.0 if last == "scale" else 0.0, 0.5, a.shape))
    return jax.tree_util.tree_map_with_path(draw, params)


def layer_norm(x, g, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_vit(P, x_nchw, heads, patch):
    """torchvision's VisionTransformer.forward in float64 NumPy from the equations."""
    P = jax.tree.map(np.asarray, P)
    n, c, h, w = x_nchw.shape
    W = P["conv_proj"]["w"].transpose(3, 2, 0, 1)                 # HWIO -> OIHW
    nh, nw = h // patch, w // patch
    conv = np.zeros((n, W.shape[0], nh, nw))
    for i in range(nh):
        for j in range(nw):
            win = x_nchw[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
            conv[:, :, i, j] = np.einsum("ncpq,ocpq->no", win, W) + P["conv_proj"]["b"]
    tok = conv.reshape(n, W.shape[0], nh * nw).transpose(0, 2, 1)   # flatten(2).transpose(1, 2)
    cls = np.broadcast_to(P["class_token"]["token"], (n, 1, W.shape[0]))
    z = np.concatenate([cls, tok], axis=1) + P["pos_embedding"]["w"][None]
    t, d = z.shape[1], z.shape[2] // heads
    L = P["layers"]
    for k in range(L["attention"]["ln_1"]["scale"].shape[0]):
        at = lambda tree: jax.tree.map(lambda a: a[k], tree)
        A, M = at(L["attention"]), at(L["mlp"])
        u = layer_norm(z, A["ln_1"]["scale"], A["ln_1"]["offset"])
        S = A["self_attention"]
        split = lambda y: y.reshape(n, t, heads, d).transpose(0, 2, 1, 3)
        q, kk, v = (split(u @ S[m]["w"] + S[m]["b"]) for m in "qkv")
        s = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(n, t, -1)
        z = z + ctx @ S["o"]["w"] + S["o"]["b"]
        u = layer_norm(z, M["ln_2"]["scale"], M["ln_2"]["offset"])
        a = u @ M["0"]["w"] + M["0"]["b"]
        z = z + (0.5 * a * (1 + ERF(a / math.sqrt(2)))) @ M["3"]["w"] + M["3"]["b"]
    y = layer_norm(z, P["ln"]["scale"], P["ln"]["offset"])[:, 0]
    if "pre_logits" in P:
        y = np.tanh(y @ P["pre_logits"]["w"] + P["pre_logits"]["b"])
    return y @ P["head"]["w"] + P["head"]["b"]


@pytest.mark.parametrize("rep", [None, 6])
def test_forward_matches_numpy_on_torch_layout(rep):
    model = VisionTransformer(**CFG, representation_size=rep)
    params, state, out = model.init(jax.random.PRNGKey(0), SHAPE)
    assert out == (2, 5)
    assert np.all(np.asarray(params["head"]["w"]) == 0)                    # as torchvision
    assert np.all(np.asarray(params["class_token"]["token"]) == 0)
    assert params["pos_embedding"]["w"].shape == (5, 8)                    # 2×2 patches + 1
    params = randomized(params, seed=1 if rep else 0)
    x_nchw = np.random.default_rng(2).normal(size=(2, 3, 8, 8))
    y, _ = jax.jit(model.apply)(params, state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(y, np_vit(params, x_nchw, 2, 4), rtol=1e-12, atol=1e-12)


def test_hand_backward_matches_vjp_eval_and_train(monkeypatch):
    """bwd of fwd's residuals against jax.vjp of apply w.r.t. params and image, eval and train
    (dropout after the positions, in attention and the MLP; the same key), one compilation."""
    model = VisionTransformer(**CFG, dropout=0.2, attention_dropout=0.25)
    params, state, _ = model.init(jax.random.PRNGKey(0), SHAPE)
    params = randomized(params)
    rng = np.random.default_rng(3)
    x, dy = jnp.asarray(rng.normal(size=SHAPE)), jnp.asarray(rng.normal(size=(2, 5)))
    real_vjp, key = jax.vjp, jax.random.PRNGKey(4)

    def run(params, x, dy):
        out = []
        for train in (False, True):
            f = lambda p, x: model.apply(p, state, x, key=key, train=train)[0]
            y, vjp = real_vjp(f, params, x)
            y2, _, res = model.fwd(params, state, x, key=key, train=train)
            out.append((y, y2, vjp(dy), model.bwd(params, state, res, dy, key=key, train=train)))
        return out
    with no_autodiff(monkeypatch):
        results = jax.jit(run)(params, x, dy)
    for train, (y, y2, ref, got) in zip((False, True), results):
        assert_trees_close(y2, y, rtol=1e-12, atol=1e-12, what=f"train={train} fwd != apply")
        assert_trees_close(got, ref, rtol=1e-9, atol=1e-11 * tree_scale(ref),
                           what=f"train={train} bwd vs jax.vjp")
    assert np.abs(np.asarray(results[0][0]) - np.asarray(results[1][0])).max() > 1e-3


def test_checks_name_the_argument():
    model = VisionTransformer(**CFG)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 8, 8, channels\)"):
        model.init(jax.random.PRNGKey(0), (1, 12, 12, 3))
    params, state, _ = model.init(jax.random.PRNGKey(0), SHAPE)
    with pytest.raises(ValueError, match="channels-last"):
        model.apply(params, state, jnp.zeros((2, 3, 8, 8)))                  # NCHW by mistake
    for bad, match in ((dict(patch_size=3), "multiple of patch_size"),
                       (dict(num_heads=3), "multiple of num_heads"),
                       (dict(num_layers=0), "num_layers"), (dict(dropout=1.0), "dropout"),
                       (dict(representation_size=0), "representation_size")):
        with pytest.raises(ValueError, match=match):
            VisionTransformer(**{**CFG, **bad})


def test_presets_have_torchvisions_sizes():
    # torchvision's documented parameter counts: ViT-B/16 86,567,656; ViT-L/32 306,535,400
    for build, n in ((vit_b_16, 86_567_656), (vit_l_32, 306_535_400)):
        model = build()
        params = jax.eval_shape(lambda k: model.init(k, (1, 224, 224, 3))[0],
                                jax.random.PRNGKey(0))
        assert count_params(params) == n
    assert vit_b_16(10, image_size=32) == VisionTransformer(32, 16, 12, 12, 768, 3072,
                                                            num_classes=10)
