"""Clipping, weight-decay masks and gradient-norm monitoring, against NumPy and optax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_trees_close

import fnn.optim as fo


def tree(rng, scale=1.0):
    return {"conv": {"w": scale * rng.normal(size=(2, 3, 4)), "b": scale * rng.normal(size=4)},
            "layers": [{"w": scale * rng.normal(size=(4, 5)), "b": scale * rng.normal(size=5)}],
            "norm": {"scale": scale * rng.normal(size=5), "offset": scale * rng.normal(size=5)}}


def np_norm(t):
    return np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(t)))


def apply(tx, updates, params=None):
    return jax.jit(lambda u, p: tx.update(u, tx.init(u), p)[0])(updates, params)


def test_global_norm_clip_caps_the_norm_exactly_and_keeps_direction(rng):
    g = tree(rng, scale=3.0)
    c = 0.5 * np_norm(g)
    out = apply(fo.clip_by_global_norm(c), g)
    np.testing.assert_allclose(np_norm(out), c, rtol=1e-14)
    assert_trees_close(out, jax.tree.map(lambda b: b * (c / np_norm(g)), g), rtol=1e-14, atol=0)
    ref = apply(optax.clip_by_global_norm(c), g)
    assert_trees_close(out, ref, rtol=1e-14, atol=0)


def test_global_norm_clip_leaves_small_updates_alone(rng):
    g = tree(rng)
    out = apply(fo.clip_by_global_norm(np_norm(g) * 1.01), g)
    assert_trees_close(out, g, rtol=0, atol=0)


def test_leaf_norm_clip_caps_each_leaf(rng):
    g = tree(rng, scale=2.0)
    c = 6.0
    out = apply(fo.clip_by_leaf_norm(c), g)
    assert_trees_close(out, jax.tree.map(lambda b: b * min(1.0, c / np.linalg.norm(b)), g),
                       rtol=1e-14, atol=0)
    norms = jax.tree.map(np.linalg.norm, g)
    assert_trees_close(jax.tree.map(np.linalg.norm, out), jax.tree.map(lambda n: min(n, c), norms),
                       rtol=1e-14, atol=0)
    assert 0 < sum(n > c for n in jax.tree.leaves(norms)) < len(jax.tree.leaves(g))  # both branches


def test_value_clip_matches_numpy_and_optax(rng):
    g = tree(rng, scale=2.0)
    out = apply(fo.clip_by_value(1.5), g)
    assert_trees_close(out, jax.tree.map(lambda b: np.clip(b, -1.5, 1.5), g), rtol=0, atol=0)
    ref = apply(optax.clip(1.5), g)
    assert_trees_close(out, ref, rtol=0, atol=0)


def test_grad_norms_match_numpy(rng):
    g = tree(rng)
    norms = jax.jit(fo.grad_norms)(g)
    np.testing.assert_allclose(norms.global_norm, np_norm(g), rtol=1e-14)
    np.testing.assert_allclose(fo.global_norm(g), np_norm(g), rtol=1e-14)
    assert_trees_close(norms.leaf_norms, jax.tree.map(np.linalg.norm, g), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- weight decay

NO_DECAY = ("b", "scale", "offset")


def test_not_named_selects_by_key_path(rng):
    mask = fo.resolve_mask(fo.not_named(*NO_DECAY), tree(rng))
    assert mask == {"conv": {"w": True, "b": False}, "layers": [{"w": True, "b": False}],
                    "norm": {"scale": False, "offset": False}}


def by_name(params):  # an optax-style mask: params -> bool tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, [path[-1].key not in NO_DECAY for path, _ in flat])


@pytest.mark.parametrize("mask_kind", ["predicate", "bool_tree", "optax_function"])
def test_add_decayed_weights_with_mask(mask_kind, rng):
    params, g = tree(rng), tree(rng)
    pred = fo.not_named(*NO_DECAY)
    mask = {"predicate": pred, "bool_tree": by_name(params), "optax_function": by_name}[mask_kind]
    out = apply(fo.add_decayed_weights(0.1, mask), g, params)
    want = jax.tree_util.tree_map_with_path(
        lambda path, p, gi: gi + 0.1 * p if path[-1].key not in NO_DECAY else gi, params, g)
    assert_trees_close(out, want, rtol=1e-15, atol=0)
    ref = apply(optax.add_decayed_weights(0.1, by_name), g, params)
    assert_trees_close(out, ref, rtol=0, atol=0)


def test_scheduled_weight_decay_follows_the_schedule(rng):
    params, g = tree(rng), tree(rng)
    tx = fo.add_decayed_weights(lambda t: 0.1 * (t + 1), fo.not_named(*NO_DECAY))
    step = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(3):
        out, state = step(g, state, params)
        np.testing.assert_allclose(out["conv"]["w"], g["conv"]["w"] + 0.1 * (t + 1)
                                   * params["conv"]["w"], rtol=1e-14)
        np.testing.assert_array_equal(out["conv"]["b"], g["conv"]["b"])
    assert state.count == 3


def test_mask_with_wrong_structure_raises(rng):
    params = tree(rng)
    with pytest.raises(TypeError, match="mask: .*(.|\n)*mask tree: PyTreeDef"):
        apply(fo.add_decayed_weights(0.1, {"conv": True}), params, params)


def test_scale_by_learning_rate_with_schedule(rng):
    g = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    tx = fo.scale_by_learning_rate(lambda t: 0.5 ** t)
    state = tx.init(g)
    for t in range(3):
        out, state = tx.update(g, state)
        assert out["w"].dtype == jnp.float32
        np.testing.assert_allclose(out["w"], -(0.5 ** t) * np.asarray(g["w"]), rtol=1e-7)
