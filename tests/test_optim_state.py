"""Optimizer state is a plain pytree: jit, tree.map, save/load; no recompiles; clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close

import fnn.optim as fo
from fnn.optim import schedules

PARAMS = {"w": np.arange(6.0).reshape(2, 3) / 10, "b": np.array([0.5, -0.5]),
          "norm": {"scale": np.ones(3)}}


def grads_at(i):
    rng = np.random.default_rng(i)
    return jax.tree.map(lambda p: rng.normal(size=p.shape), PARAMS)


def make_opts():
    lr = schedules.warmup_cosine(0.0, 1e-2, 3, 20)
    return {
        "adamw": fo.chain(fo.clip_by_global_norm(1.0),
                          fo.adamw(lr, weight_decay=1e-2, mask=fo.not_named("b", "scale"))),
        "sgd_momentum": fo.sgd(0.1, 0.9, nesterov=True),
        "rmsprop_centered": fo.rmsprop(lr, centered=True, momentum=0.5),
        "lion": fo.lion(lr),
    }


@pytest.fixture(scope="module")
def opts():
    return make_opts()


@pytest.fixture(scope="module")
def steps(opts):
    return {k: jax.jit(o.update) for k, o in opts.items()}


def train(step, state, params, start, n):
    for i in range(start, start + n):
        updates, state = step(grads_at(i), state, params)
        params = fo.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", list(make_opts()))
def test_state_roundtrip_through_savez(name, opts, steps, tmp_path):
    opt, step = opts[name], steps[name]
    p_all, s_all = train(step, opt.init(PARAMS), PARAMS, 0, 6)

    p_half, s_half = train(step, jax.jit(opt.init)(PARAMS), PARAMS, 0, 3)
    leaves, treedef = jax.tree.flatten(s_half)
    np.savez(tmp_path / "opt.npz", *leaves)
    with np.load(tmp_path / "opt.npz") as f:
        loaded = jax.tree.unflatten(treedef, [jnp.asarray(f[f"arr_{i}"]) for i in range(len(f))])
    assert jax.tree.structure(loaded) == treedef
    p_resumed, s_resumed = train(step, loaded, p_half, 3, 3)

    assert_trees_close((p_resumed, s_resumed), (p_all, s_all), rtol=0, atol=0)
    dtypes = lambda t: [a.dtype for a in jax.tree.leaves(t)]     # not compared by the helper
    assert dtypes((p_resumed, s_resumed)) == dtypes((p_all, s_all))


@pytest.mark.parametrize("name", list(make_opts()))
def test_state_survives_tree_map(name, opts, steps):
    opt, step = opts[name], steps[name]
    state = opt.init(PARAMS)
    copied = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    assert jax.tree.structure(copied) == jax.tree.structure(state)
    a = train(step, state, PARAMS, 0, 2)
    b = train(step, copied, PARAMS, 0, 2)
    assert_trees_close(a, b, rtol=0, atol=0)


def test_counts_are_int32_scalars():
    state = fo.adam(schedules.constant(1e-3)).init(PARAMS)
    counts = [s.count for s in state if hasattr(s, "count")]
    assert len(counts) == 2
    for c in counts:
        assert c.shape == () and c.dtype == jnp.int32
    assert fo.safe_increment(jnp.array(np.iinfo(np.int32).max, jnp.int32)) == np.iinfo(np.int32).max


def test_second_jitted_update_does_not_recompile(opts):
    traces = []
    opt = opts["adamw"]

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = opt.update(grads, state, params)
        return fo.apply_updates(params, updates), state

    params, state = PARAMS, opt.init(PARAMS)
    for i in range(3):
        params, state = step(params, state, grads_at(i))
    assert len(traces) == 1


def test_mismatched_grads_raise_type_error_naming_both_trees():
    opt = fo.adam(1e-3)
    state = opt.init(PARAMS)
    bad = {"w": PARAMS["w"], "b": PARAMS["b"]}
    with pytest.raises(TypeError, match=r"scale_by_adam: the gradient tree does not match"
                                        r"(.|\n)*gradient tree: PyTreeDef(.|\n)*optimizer state"):
        opt.update(bad, state, PARAMS)
    with pytest.raises(TypeError, match=r"apply_updates: (.|\n)*params tree: PyTreeDef"):
        fo.apply_updates(PARAMS, bad)
    with pytest.raises(TypeError, match="add_decayed_weights"):
        fo.add_decayed_weights(1e-2).update(bad, fo.EmptyState(), PARAMS)
    with pytest.raises(TypeError, match="trace: the gradient tree"):
        fo.sgd(0.1, 0.9).update(bad, fo.sgd(0.1, 0.9).init(PARAMS), PARAMS)


def test_argument_errors():
    opt = fo.adamw(1e-3)
    with pytest.raises(ValueError, match="add_decayed_weights: update needs params"):
        jax.eval_shape(lambda: opt.update(PARAMS, opt.init(PARAMS)))  # traced only
    with pytest.raises(ValueError, match="sgd: nesterov=True needs momentum"):
        fo.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="chain: expected a state tuple of 2"):
        fo.adam(1e-3).update(PARAMS, (), PARAMS)
