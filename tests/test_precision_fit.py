"""Mixed precision in training: ``fit(precision=...)`` and the combinators it stands for, loss
scaling inside the compiled epoch
(a skipped step is not applied), and ``fnn train --precision``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import cli, losses, optim, train
from fnn.layers import Dense, Relu, serial
from fnn.precision import loss_scale, loss_scaling, mixed_precision
from fnn.train import fit

F32 = jnp.dtype("float32")
K = jax.random.PRNGKey(0)
LINEAR = Dense(4, use_bias=False)


def tiny_regression(n=64):
    """Inputs ~1e-4 and targets a small linear change off the initial model: the weight
    gradients of the MSE are ~1e-9, under float16's smallest subnormal (6e-8), even summed
    over the batch in float32 before rounding."""
    rng = np.random.default_rng(0)
    params, _, _ = LINEAR.init(K, (n, 16))
    params = jax.tree.map(lambda a: a.astype(F32), params)
    x = (rng.standard_normal((n, 16)) * 1e-4).astype(np.float32)
    w = np.asarray(params["w"]) + 0.1 * rng.standard_normal((16, 4)).astype(np.float32)
    return params, x, (x @ w).astype(np.float32)


def run(precision, scaling=None, grad="autodiff", epochs=8):
    """``fit`` from the params of :func:`tiny_regression` with the combinators written out:
    the model under ``precision`` and the optimizer with ``scaling`` (``None``, ``"dynamic"``
    or a static scale)."""
    params, x, y = tiny_regression()
    model = LINEAR if precision is None else mixed_precision(LINEAR, precision)
    opt = optim.adam(1e-2)
    if scaling == "dynamic":
        opt = loss_scaling(opt)
    elif scaling is not None:
        opt = loss_scaling(opt, initial=float(scaling), dynamic=False)
    ts = train.create_train_state(model, opt, K, (16, 16), params=params)
    return fit(model, losses.mse, opt, (x, y), epochs=epochs, batch_size=16, train_state=ts,
               step=train.Step(grad=grad), loop=train.Loop(shuffle=False, progress=False)), params


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_float16_gradients_underflow_without_loss_scaling_and_train_with_it(grad):
    (plain, p0), (scaled, _) = run("float16", None, grad), run("float16", "dynamic", grad)
    (ref, _) = run(None, None, grad)
    # without scaling every float16 weight gradient is zero: the weights never move
    np.testing.assert_array_equal(plain.train_state.params["w"], p0["w"])
    assert not np.array_equal(scaled.train_state.params["w"], p0["w"])
    assert plain.history["loss"][-1] == pytest.approx(plain.history["loss"][0], rel=1e-3)
    assert ref.history["loss"][-1] < 0.8 * ref.history["loss"][0]       # float32 learns ...
    np.testing.assert_allclose(scaled.history["loss"], ref.history["loss"], rtol=0.05)  # so 16
    assert scaled.history["loss_scale"] == [2.0 ** 15] * 8          # no overflow, < 2000 steps
    assert all(a.dtype == F32 for a in jax.tree.leaves(scaled.train_state.params))
    inner = scaled.train_state.opt_state.inner[0]                     # Adam's moments
    assert all(a.dtype == F32 for a in jax.tree.leaves((inner.mu, inner.nu)))


def test_bfloat16_fit_keeps_float32_master_weights_and_tracks_float32():
    _, x, y = tiny_regression()
    x, y = x * 1e4, y * 1e4
    model = serial(Dense(16), Relu(), Dense(4))
    kw = dict(epochs=3, batch_size=16, key=K, loop=train.Loop(shuffle=False, progress=False))
    ref = fit(model, losses.mse, optim.adam(1e-2), (x, y), **kw)
    low = fit(model, losses.mse, optim.adam(1e-2), (x, y), precision="bfloat16", **kw)
    assert "loss_scale" not in low.history                           # bfloat16: no scaling
    assert all(a.dtype == F32 for a in jax.tree.leaves(low.train_state.params))
    np.testing.assert_allclose(low.history["loss"], ref.history["loss"], rtol=5e-2)


def test_a_non_finite_step_is_skipped_and_the_scale_halves():
    opt = loss_scaling(optim.sgd(0.1), growth_interval=3)
    params = {"w": jnp.ones(3, F32)}
    state = opt.init(params)
    bad = {"w": jnp.array([1.0, jnp.inf, 0.0], F32)}
    updates, new = opt.update(bad, state, params)
    assert float(jnp.max(jnp.abs(updates["w"]))) == 0.0                   # not applied
    assert float(new.loss_scale.scale) == 2.0 ** 14
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new.inner, state.inner))
    good = {"w": jnp.full(3, 2.0 ** 14, F32)}                               # = 1 once unscaled
    for _ in range(3):
        updates, new = opt.update(good, new, params)
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3), rtol=1e-6)
    assert float(new.loss_scale.scale) == 2.0 ** 15                    # grown after 3 good steps


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
def test_a_skipped_step_leaves_a_stateful_optimizer_untouched(bad):
    """Adam inside loss_scaling: two good steps make its count, mu and nu non-trivial; a
    non-finite step leaves all three bit for bit as they were (and applies nothing); the next
    good steps then match plain optax Adam fed the good gradients only."""
    import optax
    scale = 2.0 ** 4
    opt = loss_scaling(optax.adam(0.1), initial=scale, dynamic=False)
    params = {"w": jnp.array([1.0, -2.0, 0.5], F32)}
    grads = [jnp.array(g, F32) for g in ([0.3, -1.0, 2.0], [0.5, 0.25, -1.5], [-0.7, 0.1, 0.2],
                                         [0.05, -0.4, 0.9])]
    state = opt.init(params)
    for g in grads[:2]:
        _, state = opt.update({"w": g * scale}, state, params)
    before = jax.tree.map(np.array, state.inner)
    assert int(before[0].count) == 2 and np.all(before[0].mu["w"] != 0)
    updates, state = opt.update({"w": jnp.array([1.0, bad, 0.0], F32) * scale}, state, params)
    assert float(jnp.max(jnp.abs(updates["w"]))) == 0.0
    adam = state.inner[0]
    assert int(adam.count) == 2
    np.testing.assert_array_equal(adam.mu["w"], before[0].mu["w"])
    np.testing.assert_array_equal(adam.nu["w"], before[0].nu["w"])
    ref = optax.adam(0.1)
    ref_state = ref.init(params)
    for g in grads[:2]:
        _, ref_state = ref.update({"w": g}, ref_state, params)
    for g in grads[2:]:
        want, ref_state = ref.update({"w": g}, ref_state, params)
        got, state = opt.update({"w": g * scale}, state, params)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)


def test_the_precision_short_hand_is_the_two_combinators():
    """precision="float16" is mixed_precision(model, "float16") with loss_scaling(optimizer)
    (dynamic, from 2**15); "bfloat16" the model alone: the same bits either way."""
    _, x, y = tiny_regression()
    kw = dict(epochs=2, batch_size=16, key=K, loop=train.Loop(shuffle=False, progress=False))
    for p, scaled in (("float16", True), ("bfloat16", False)):
        short = fit(LINEAR, losses.mse, optim.adam(1e-2), (x, y), precision=p, **kw)
        opt = loss_scaling(optim.adam(1e-2)) if scaled else optim.adam(1e-2)
        long = fit(mixed_precision(LINEAR, p), losses.mse, opt, (x, y), **kw)
        jax.tree.map(np.testing.assert_array_equal, short.train_state, long.train_state)
        assert short.history["loss"] == long.history["loss"]
        assert ("loss_scale" in short.history) == scaled


def test_static_loss_scale_and_bfloat16_with_a_scale_given():
    r, _ = run("bfloat16", 1024.0, epochs=2)
    assert r.history["loss_scale"] == [1024.0, 1024.0]
    assert float(loss_scale(8.0).scale) == 8.0


@pytest.mark.parametrize("kw,match", [
    (dict(precision="float12"), r"unknown dtype 'float12'"),
    (dict(precision="compute=int8"), r"dtypes must be floating point, got int8"),
    (dict(precision="bfloat16", step=train.Step(grad=lambda *a, **k: None)),
     r"precision= needs grad="),
])
def test_fit_precision_errors(kw, match):
    _, x, y = tiny_regression(8)
    with pytest.raises(ValueError, match=match):
        fit(Dense(4), losses.mse, optim.sgd(0.1), (x, y), epochs=1, batch_size=4, key=K, **kw,
            loop=train.Loop(progress=False))


def test_cli_rejects_an_unknown_precision(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "xor", "--precision", "float12"])
    assert e.value.code == 2
    assert "unknown dtype 'float12'" in capsys.readouterr().err
