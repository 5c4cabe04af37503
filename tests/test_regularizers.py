"""L1/L2 penalties (values, hand-derived gradients, masks) and early stopping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close

import fnn.optim as fo
from fnn import regularizers as R

NO_DECAY = fo.not_named("b", "scale")


def tree(rng):
    return {"dense": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)},
            "norm": {"scale": rng.normal(size=4)}, "out": [rng.normal(size=(4, 2))]}


def decayed_leaves(params):
    """(leaf, decays?) pairs, from the key names directly (independent of resolve_mask)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = lambda path: {getattr(k, "key", None) for k in path}
    return [(np.asarray(x), not names(p) & {"b", "scale"}) for p, x in flat]


@pytest.mark.parametrize("masked", [False, True])
def test_l2_value_and_grad(masked, rng):
    params = tree(rng)
    reg = R.l2(0.3, mask=NO_DECAY if masked else None)
    pairs = [(x, keep or not masked) for x, keep in decayed_leaves(params)]
    want = 0.3 * 0.5 * sum(np.sum(x * x) for x, keep in pairs if keep)
    np.testing.assert_allclose(jax.jit(reg.value)(params), want, rtol=1e-14)
    grad = jax.jit(reg.grad)(params)
    want = [0.3 * x if keep else np.zeros_like(x) for x, keep in pairs]
    assert_trees_close(grad, jax.tree.unflatten(jax.tree.structure(params), want), rtol=1e-14,
                       atol=0)
    auto = jax.jit(jax.grad(reg.value))(params)
    assert_trees_close(grad, auto, rtol=1e-14, atol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_l1_value_and_grad(masked, rng):
    params = tree(rng)
    params["dense"]["w"][0, 0] = 0.0  # the subgradient at 0 is 0
    reg = R.l1(0.2, mask=NO_DECAY if masked else None)
    pairs = [(x, keep or not masked) for x, keep in decayed_leaves(params)]
    want = 0.2 * sum(np.sum(np.abs(x)) for x, keep in pairs if keep)
    np.testing.assert_allclose(jax.jit(reg.value)(params), want, rtol=1e-14)
    grad = jax.jit(reg.grad)(params)
    want = [0.2 * np.sign(x) if keep else np.zeros_like(x) for x, keep in pairs]
    assert_trees_close(grad, jax.tree.unflatten(jax.tree.structure(params), want), rtol=0, atol=0)
    auto = jax.jit(jax.grad(reg.value))(params)  # agrees away from 0 (autodiff gives 1 at 0)
    auto["dense"]["w"] = auto["dense"]["w"].at[0, 0].set(0.0)
    assert_trees_close(grad, auto, rtol=0, atol=0)


def test_l2_with_sgd_equals_weight_decay(rng):
    params, g = tree(rng), tree(rng)
    reg = R.l2(0.1, mask=NO_DECAY)
    via_penalty = fo.sgd(0.5).update(jax.tree.map(jnp.add, g, reg.grad(params)),
                                     fo.sgd(0.5).init(params))[0]
    decayed = fo.chain(fo.add_decayed_weights(0.1, NO_DECAY), fo.sgd(0.5))
    via_decay = decayed.update(g, decayed.init(params), params)[0]
    assert_trees_close(via_penalty, via_decay, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- early stopping

def early_stopping_reference(losses, patience, min_delta):
    """Keras' rule in plain Python: returns (stop index or None, best index)."""
    best, best_i, wait = np.inf, None, 0
    for i, loss in enumerate(losses):
        if loss < best - min_delta:
            best, best_i, wait = loss, i, 0
        else:
            wait += 1
            if wait >= patience:
                return i, best_i
    return None, best_i


LOSSES = [1.0, 0.8, 0.79, 0.6, 0.65, 0.595, 0.62, 0.61, 0.5, 0.4]


@pytest.mark.parametrize("patience, min_delta", [(2, 0.0), (3, 0.0), (3, 0.01), (20, 0.0)])
def test_early_stopping_in_a_scan_matches_reference(patience, min_delta):
    es = R.early_stopping(patience, min_delta)
    params = {"w": jnp.zeros(2)}

    def epoch(state, i):  # the "params" of epoch i are [i, -i], so restore_best names the epoch
        p = {"w": jnp.stack([i, -i]).astype(jnp.float64)}
        state = es.update(state, jnp.asarray(LOSSES)[i], p)
        return state, state.stop

    final, stops = jax.jit(lambda s: jax.lax.scan(epoch, s, jnp.arange(len(LOSSES))))(
        es.init(params))
    stop_at, best_at = early_stopping_reference(LOSSES, patience, min_delta)
    first_stop = int(np.argmax(stops)) if bool(stops.any()) else None
    assert first_stop == stop_at
    assert bool(final.stop) == (stop_at is not None)
    np.testing.assert_array_equal(R.restore_best(final)["w"], [best_at, -best_at])
    assert int(final.best_step) == best_at
    np.testing.assert_allclose(final.best_loss, LOSSES[best_at])
    assert int(final.step) == (stop_at + 1 if stop_at is not None else len(LOSSES))


def test_early_stopping_keeps_init_params_until_an_improvement():
    es = R.early_stopping(patience=1)
    s = es.init({"w": jnp.ones(1)})
    np.testing.assert_array_equal(R.restore_best(s)["w"], [1.0])
    s = es.update(s, jnp.nan, {"w": jnp.full(1, 2.0)})  # nan never improves
    assert bool(s.stop) and int(s.wait) == 1
    np.testing.assert_array_equal(R.restore_best(s)["w"], [1.0])


def test_early_stopping_errors():
    with pytest.raises(ValueError, match="early_stopping: patience must be at least 1, got 0"):
        R.early_stopping(0)
    es = R.early_stopping(2)
    with pytest.raises(TypeError, match="early_stopping: the params tree does not match the best params tree"):
        es.update(es.init({"w": jnp.ones(1)}), 1.0, {"v": jnp.ones(1)})
