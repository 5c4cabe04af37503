"""Wrong-shaped parameters are refused at trace time (issue 18, defect 2), and Dense takes any
leading axes, none included (defect 7): vmap over single examples equals the batched call."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import checkpoint
from fnn.layers import GRU, LSTM, Conv, ConvTranspose, Dense, Embedding, LayerNorm, Relu, serial
from fnn.layers._param_shapes import check_param_shapes

K = jax.random.PRNGKey(0)
ones = jnp.ones


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dense_refuses_wrong_kernel_width(jit):
    layer = Dense(5)
    apply = jax.jit(layer.apply) if jit else layer.apply
    with pytest.raises(ValueError, match=r"Dense\(5\): parameter 'w' has shape \(3, 7\), "
                                         r"expected \(3, 5\)"):
        apply({"w": ones((3, 7)), "b": ones(7)}, {}, ones((2, 3)))
    with pytest.raises(ValueError, match=r"Dense\(5\): parameter 'b' has shape \(7,\), "
                                         r"expected \(5,\)"):
        layer.backward({"w": ones((3, 5)), "b": ones(7)}, {}, ones((2, 3)), ones((2, 5)))


def test_dense_refuses_missing_and_extra_params():
    with pytest.raises(ValueError, match=r"Dense\(5\): expected parameters \['b', 'w'\], got "
                                         r"\['w'\] \(missing \['b'\]\)"):
        Dense(5).apply({"w": ones((3, 5))}, {}, ones((2, 3)))
    with pytest.raises(ValueError, match=r"unexpected \['b'\]"):
        Dense(5, use_bias=False).apply({"w": ones((3, 5)), "b": ones(5)}, {}, ones((2, 3)))
    with pytest.raises(TypeError, match=r"Dense\(5\): expected a dict of parameters"):
        Dense(5).apply([ones((3, 5))], {}, ones((2, 3)))


def test_checkpoint_loaded_without_like_into_narrower_model(tmp_path):
    wide = serial(Dense(64), Relu(), Dense(10))
    params, state, _ = wide.init(K, (2, 16))
    path = checkpoint.save(str(tmp_path / "wide.safetensors"), params)
    loaded = checkpoint.load(path)                       # no like=: the file's own shapes
    narrow = serial(Dense(32), Relu(), Dense(10))
    _, nstate, _ = narrow.init(K, (2, 16))
    with pytest.raises(ValueError, match=r"Dense\(32\): parameter 'w' has shape \(16, 64\), "
                                         r"expected \(16, 32\)"):
        jax.jit(narrow.apply)(loaded, nstate, ones((2, 16)))


def test_conv_embedding_recurrent_refuse_foreign_params():
    p64, _, _ = Conv(64, (3, 3)).init(K, (1, 5, 5, 2))
    with pytest.raises(ValueError, match=r"Conv\(32, \(3, 3\)\): parameter 'w' has shape "
                                         r"\(3, 3, 2, 64\), expected \(3, 3, 2, 32\)"):
        Conv(32, (3, 3)).apply(p64, {}, ones((1, 5, 5, 2)))
    pt, _, _ = ConvTranspose(4, (2, 2)).init(K, (1, 3, 3, 2))
    with pytest.raises(ValueError, match=r"ConvTranspose\(4, \(2, 2\)\): parameter 'b'"):
        ConvTranspose(4, (2, 2)).apply({**pt, "b": ones(3)}, {}, ones((1, 3, 3, 2)))
    with pytest.raises(ValueError, match=r"Embedding\(7, 4\): parameter 'w' has shape \(9, 4\), "
                                         r"expected \(7, 4\)"):
        Embedding(7, 4).apply({"w": ones((9, 4))}, {}, jnp.zeros((2, 3), jnp.int32))
    pl, sl, _ = LSTM(6).init(K, (2, 3, 4))
    with pytest.raises(ValueError, match=r"LSTM\(5\): parameter 'wh' has shape \(6, 24\), "
                                         r"expected \(5, 20\)"):
        LSTM(5).apply({**pl, "wi": ones((4, 20)), "b": ones(20)}, sl, ones((2, 3, 4)))
    pg, sg, _ = GRU(3).init(K, (2, 3, 4))
    with pytest.raises(ValueError, match=r"GRU\(3\): parameter 'bh' has shape \(2,\)"):
        GRU(3).backward({**pg, "bh": ones(2)}, sg, ones((2, 3, 4)), ones((2, 3, 3)))
    with pytest.raises(ValueError, match=r"LayerNorm.*'scale' has shape \(3,\)"):
        LayerNorm().apply({"scale": ones(3), "offset": ones(4)}, {}, ones((2, 4)))


def test_helper_accepts_matching_params():
    check_param_shapes("X", {"w": ones((2, 3))}, {"w": (2, 3)})      # no error


# --------------------------------------------------------------------------- any leading axes

def test_dense_init_and_apply_unbatched():
    layer = Dense(3)
    params, state, out = layer.init(K, (5,))
    assert out == (3,)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(5))
    y, _ = layer.apply(params, state, x)
    ref = np.asarray(x) @ np.asarray(params["w"]) + np.asarray(params["b"])
    chex.assert_trees_all_close(y, ref, rtol=1e-12)
    dp, dx = layer.backward(params, state, x, jnp.ones(3))
    chex.assert_trees_all_close(dp, {"w": np.outer(x, np.ones(3)), "b": np.ones(3)}, rtol=1e-12)
    chex.assert_trees_all_close(dx, np.asarray(params["w"]).sum(axis=1), rtol=1e-12)


def test_vmap_over_examples_equals_batch():
    model = serial(Dense(8), Relu(), Dense(3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 4)))
    params, state, _ = model.init(K, (4,))                  # an unbatched input shape
    batched = model.apply(params, state, x)[0]
    mapped = jax.vmap(lambda xi: model.apply(params, state, xi)[0])(x)
    chex.assert_trees_all_close(mapped, batched, rtol=1e-12)
    grads = jax.vmap(lambda xi, gi: model.backward(params, state, xi, gi)[1])(x, jnp.ones((6, 3)))
    chex.assert_trees_all_close(grads, model.backward(params, state, x, jnp.ones((6, 3)))[1],
                                rtol=1e-12)


def test_layernorm_and_embedding_take_any_leading_axes():
    ln = LayerNorm()
    p, s, _ = ln.init(K, (2, 4))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)))
    chex.assert_trees_all_close(jax.vmap(lambda xi: ln.apply(p, s, xi)[0])(x),
                                ln.apply(p, s, x)[0], rtol=1e-12)
    emb = Embedding(7, 4)
    pe, se, out = emb.init(K, ())
    assert out == (4,)
    chex.assert_trees_all_close(emb.apply(pe, se, jnp.asarray(3))[0], pe["w"][3])
