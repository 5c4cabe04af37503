"""Loss scaling's small pieces, each against a value computed here: the edge cases a mutation
run of ``fnn/precision/scaling.py`` showed no other test could fail on (dtypes kept, the
defaults PyTorch's GradScaler uses, keywords passed through, messages naming the argument)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import optim
from fnn.precision import (LossScale, ScaledLoss, all_finite, loss_scale, loss_scaling,
                           scale_loss, update_scale)

BF16 = jnp.dtype("bfloat16")


def test_loss_scale_takes_any_positive_start_and_keeps_it_float32():
    assert float(loss_scale(0.5).scale) == 0.5                     # positive, below one
    ls = loss_scale(1024)                                          # an int start
    assert ls.scale.dtype == jnp.float32 and float(ls.scale) == 1024.0
    assert ls.good_steps.dtype == jnp.int32 and int(ls.good_steps) == 0
    with pytest.raises(ValueError, match="loss_scale: the initial scale must be positive"):
        loss_scale(0.0)


def test_scale_loss_and_scaled_loss_grad_keep_the_value_dtype():
    v = jnp.asarray([0.25, -3.0], BF16)
    out = scale_loss(v, loss_scale(8.0))
    assert out.dtype == BF16
    np.testing.assert_array_equal(np.asarray(out, np.float64), [2.0, -24.0])

    class Loss:                                     # a loss whose value and grad need a keyword
        def __call__(self, pred, target, *, weight):
            return jnp.sum(weight * (pred - target) ** 2)

        def grad(self, pred, target, *, weight):
            return 2 * weight * (pred - target)

    p, t = jnp.asarray([1.0, 2.0], BF16), jnp.asarray([0.0, 0.0], BF16)
    sl = ScaledLoss(Loss(), jnp.asarray(4.0, jnp.float32))
    assert float(sl(p, t, weight=3.0)) == 15.0                     # value not scaled
    g = sl.grad(p, t, weight=3.0)
    assert g.dtype == BF16
    np.testing.assert_array_equal(np.asarray(g, np.float64), [24.0, 48.0])   # 2·3·(p−t)·4


def test_all_finite_of_an_empty_tree_is_true():
    assert bool(all_finite({})) and bool(all_finite([]))
    assert not bool(all_finite({"a": jnp.asarray([1.0, jnp.nan])}))


def test_update_scale_default_grows_after_2000_finite_steps_as_gradscaler():
    at = lambda good: update_scale(LossScale(jnp.float32(4.0), jnp.int32(good)), True)
    before, grown = at(1998), at(1999)
    assert (float(before.scale), int(before.good_steps)) == (4.0, 1999)
    assert (float(grown.scale), int(grown.good_steps)) == (8.0, 0)


def test_loss_scaling_names_a_bad_growth_interval():
    with pytest.raises(ValueError, match="loss_scaling: growth_interval must be >= 1, got 0"):
        loss_scaling(optim.sgd(0.1), growth_interval=0)


def test_loss_scaling_grows_after_its_default_2000_finite_steps_and_accepts_interval_one():
    params = {"w": jnp.ones(3)}
    g = {"w": jnp.full(3, 2.0 ** 15)}                         # d(scale · loss): unscaled, 1.0

    def after(opt, good):
        state = opt.init(params)
        state = state._replace(loss_scale=LossScale(jnp.float32(2.0 ** 15), jnp.int32(good)))
        return opt.update(g, state, params)[1].loss_scale

    default = loss_scaling(optim.sgd(0.1))
    assert float(after(default, 1998).scale) == 2.0 ** 15
    assert float(after(default, 1999).scale) == 2.0 ** 16
    every = loss_scaling(optim.sgd(0.1), growth_interval=1)   # the smallest valid interval
    assert float(after(every, 0).scale) == 2.0 ** 16


def test_loss_scaling_hands_the_params_to_the_inner_optimizer():
    # AdamW's decoupled decay reads the params: the wrapped update must equal AdamW's own on the
    # unscaled gradient (and differ from AdamW's without params, which cannot decay)
    params = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    grad = {"w": jnp.asarray([0.5, 0.25, -1.0])}
    inner = optim.adamw(0.1, weight_decay=0.5)
    opt = loss_scaling(inner, initial=8.0)
    got, _ = opt.update(jax.tree.map(lambda a: a * 8.0, grad), opt.init(params), params)
    want, _ = inner.update(grad, inner.init(params), params)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    # AdamW's first step is -lr·(sign(g) + wd·w): the decay term is visible
    np.testing.assert_allclose(want["w"], -0.1 * (np.sign([0.5, 0.25, -1.0]) + 0.5 * np.asarray(
        [1.0, -2.0, 3.0])), rtol=1e-5, atol=1e-6)
