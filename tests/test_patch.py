"""Vision Transformer tokens: PatchEmbedding against Conv(stride = patch, VALID) flattened and a
float64 NumPy reference; ClassToken and SelectToken against NumPy; a small ViT composed from
public layers, its hand backward against jax.vjp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import initializers as inits
from fnn.layers import (ClassToken, Conv, Dense, LayerNorm, PatchEmbedding, PositionalEmbedding,
                        SelectToken, TransformerBlock, serial)

from helpers import check_pair


def np_patch_embed(x, w, b, ph, pw):
    """Each (ph, pw) patch, row-major over the grid, times the HWIO kernel, from the definition."""
    bsz, h, wd, c = x.shape
    out = []
    for i in range(0, h, ph):
        for j in range(0, wd, pw):
            out.append(np.einsum("bhwc,hwcf->bf", x[:, i:i + ph, j:j + pw], w))
    return np.stack(out, axis=1) + (0 if b is None else b)


@pytest.mark.parametrize("patch,use_bias", [(2, True), ((3, 2), False)])
def test_patch_embedding_matches_numpy_and_strided_conv(patch, use_bias, rng, monkeypatch):
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    layer = PatchEmbedding(patch, 5, use_bias=use_bias)
    shape = (2, 6, 4, 3)
    params, state, out = layer.init(jax.random.PRNGKey(0), shape)
    assert out == (2, (6 // ph) * (4 // pw), 5) and params["w"].shape == (ph, pw, 3, 5)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    x = jnp.asarray(rng.normal(size=shape))
    y, _ = layer.apply(params, state, x)
    P = jax.tree.map(np.asarray, params)
    np.testing.assert_allclose(y, np_patch_embed(np.asarray(x), P["w"], P.get("b"), ph, pw),
                               rtol=1e-12, atol=1e-12)
    conv = Conv(5, (ph, pw), (ph, pw), "VALID", use_bias=use_bias)
    yc, _ = conv.apply(params, {}, x)
    np.testing.assert_allclose(y, yc.reshape(out), rtol=1e-12, atol=1e-12)
    check_pair(layer, params, state, x, jnp.asarray(rng.normal(size=out)), monkeypatch)


def test_class_token_and_select_token_match_numpy(rng, monkeypatch):
    ct = ClassToken()
    params, state, out = ct.init(jax.random.PRNGKey(0), (2, 3, 4))
    assert out == (2, 4, 4) and np.all(np.asarray(params["token"]) == 0)     # zeros, as torchvision
    params = {"token": jnp.asarray(rng.normal(size=4))}
    x, dy = jnp.asarray(rng.normal(size=(2, 3, 4))), jnp.asarray(rng.normal(size=out))
    ref = np.concatenate([np.broadcast_to(np.asarray(params["token"]), (2, 1, 4)), x], axis=1)
    np.testing.assert_array_equal(ct.apply(params, state, x)[0], ref)
    dp, dx = ct.backward(params, state, x, dy)
    np.testing.assert_allclose(dp["token"], np.asarray(dy)[:, 0].sum(0), rtol=1e-14)
    np.testing.assert_array_equal(dx, np.asarray(dy)[:, 1:])

    for index in (0, -1, 2):
        sel = SelectToken(index)
        assert sel.init(None, (2, 3, 4))[2] == (2, 4)
        np.testing.assert_array_equal(sel.apply({}, {}, x)[0], np.asarray(x)[:, index])
        d = jnp.asarray(rng.normal(size=(2, 4)))
        want = np.zeros((2, 3, 4))
        want[:, index] = d
        np.testing.assert_array_equal(sel.backward({}, {}, x, d)[1], want)


def test_small_vit_backward_matches_vjp(rng, monkeypatch):
    """torchvision's VisionTransformer layout: patches, class token, learned positions,
    pre-norm encoder blocks (exact GELU), final LayerNorm(eps=1e-6), class-token head."""
    vit = serial(("conv_proj", PatchEmbedding(2, 8)), ("class_token", ClassToken()),
                 ("pos", PositionalEmbedding(5, w_init=inits.normal(0.02))),
                 ("layer_0", TransformerBlock(2, 16, eps=1e-6)),
                 ("ln", LayerNorm(1e-6)), ("cls", SelectToken(0)), ("head", Dense(3)))
    params, state, out = vit.init(jax.random.PRNGKey(0), (2, 4, 4, 3))
    assert out == (2, 3) and params["pos"]["w"].shape == (5, 8)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape)), params)
    x, dy = jnp.asarray(rng.normal(size=(2, 4, 4, 3))), jnp.asarray(rng.normal(size=out))
    check_pair(vit, params, state, x, dy, monkeypatch)


def test_patch_errors():
    with pytest.raises(ValueError, match=r"H a multiple of 2 and W of 2, got \(2, 5, 4, 3\)"):
        PatchEmbedding(2, 4).init(jax.random.PRNGKey(0), (2, 5, 4, 3))
    with pytest.raises(ValueError, match="patch_size must be a positive int or a pair"):
        PatchEmbedding(0, 4)
    with pytest.raises(ValueError, match=r"SelectToken\(3\): expected input of shape"):
        SelectToken(3).init(None, (2, 3, 4))
    with pytest.raises(ValueError, match="ClassToken: expected input shape"):
        ClassToken().init(jax.random.PRNGKey(0), (2, 4))
