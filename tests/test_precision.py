"""Mixed precision: policies, the ``mixed_precision`` combinator over every registered layer
(hand backward against ``jax.vjp`` of the same bfloat16 forward and against float32), float32
kept where it matters, and float16 loss scaling against PyTorch GradScaler's rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import backprop, losses
from fnn.layers import BatchNorm, Dense, LayerNorm, Softmax, serial
from fnn.precision import (all_finite, full_precision, loss_scale,
                           mixed_precision, policy, scale_loss, unscale, update_scale)

from helpers import no_autodiff
from test_layers_sweep import CASES, is_float, setup

F32, BF16, F16 = jnp.dtype("float32"), jnp.dtype("bfloat16"), jnp.dtype("float16")
F64 = jnp.dtype("float64")
K = jax.random.PRNGKey(0)
REAL_VJP = jax.vjp          # the reference, kept before no_autodiff patches jax.vjp


def to32(tree):
    return jax.tree.map(lambda a: a.astype(F32) if is_float(a) else a, tree)


def tree_err(a, b):
    """Relative error of the whole tree: ‖a − b‖ / ‖b‖ (float64)."""
    sq = lambda t: sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in
                       jax.tree.leaves(t))
    diff = jax.tree.map(lambda u, v: np.asarray(u, np.float64) - np.asarray(v, np.float64), a, b)
    return np.sqrt(sq(diff)) / max(np.sqrt(sq(b)), 1e-30)


# --------------------------------------------------------------------------- policies

@pytest.mark.parametrize("spec,want", [
    ("bfloat16", (F32, BF16, F32)), ("float16", (F32, F16, F32)), ("float32", (F32, F32, F32)),
    ("params=float32,compute=bfloat16,output=bfloat16", (F32, BF16, BF16)),
    ("compute=f16", (F32, F16, F32)), (" params = float32 , compute = bf16 ", (F32, BF16, F32)),
    ("float64", (F64, F64, F64)), ("f64", (F64, F64, F64)),
])
def test_policy_parses_names_and_fields(spec, want):
    assert tuple(policy(spec)) == want
    assert policy(str(policy(spec))) == policy(spec)          # str round-trips


@pytest.mark.parametrize("spec,match", [
    ("bfloat17", r"precision policy 'bfloat17': unknown dtype 'bfloat17'"),
    ("compute=int32",
     r"precision policy 'compute=int32': dtypes must be floating point, got int32"),
    ("compute=bfloat16=float16", r"unknown dtype 'bfloat16=float16'"),
    ("params=float32,params=float32", r"each once"),
    ("compute:bfloat16,x", r"unknown dtype 'compute:bfloat16,x'"),
    ("compute=bfloat16,x", r"expected comma-separated .* got 'x'"),
    ("weights=float32", r"got 'weights=float32'"),
])
def test_policy_errors_name_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        policy(spec)


def test_policy_rejects_non_strings():
    with pytest.raises(TypeError, match=r"expected a str or Policy, got int"):
        policy(16)


# --------------------------------------------------------------------------- every layer

FIRST = [(n, i, ex) for n, i, ex in CASES if i == 0]     # one example per constructor


@pytest.mark.parametrize("name,i,ex", FIRST, ids=[n for n, _, _ in FIRST])
def test_bfloat16_hand_backward_of_every_layer(name, i, ex, monkeypatch):
    """In bfloat16 compute: the hand rules agree with ``jax.vjp`` of the same mixed forward
    (relative 2e-2 on the whole gradient) and sit no farther from the float32 gradient than the
    bfloat16 forward implies (twice autodiff's own distance, plus one bfloat16 ulp); params and
    their gradients stay float32."""
    layer, params, state, _, x, kw, key = setup(name, i, ex)
    params, state, x, kw = to32(params), to32(state), to32(x), to32(kw)
    low, high = mixed_precision(layer, "bfloat16"), mixed_precision(layer, "float32")
    y = jax.eval_shape(lambda: low.apply(params, state, x, key=key, **kw)[0])   # no eager run
    assert all(a.dtype == F32 for a in jax.tree.leaves(y) if is_float(a))
    dy = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(i).standard_normal(a.shape),
                                            a.dtype), y)
    float_x = all(is_float(a) for a in jax.tree.leaves(x))

    def all_three(params, x, dy):                 # one compilation per case
        wrt = (params, x) if float_x else (params,)

        def vjp(model):
            f = lambda *a: model.apply(a[0], state, a[1] if float_x else x, key=key, **kw)[0]
            return REAL_VJP(f, *wrt)[1](dy)
        _, _, res = low.fwd(params, state, x, key=key, **kw)
        return vjp(low), vjp(high), low.bwd(params, state, res, dy, key=key, **kw)
    with no_autodiff(monkeypatch):
        ref, ref32, (dp, dx) = jax.jit(all_three)(params, x, dy)
    hand = (dp, dx) if float_x else (dp,)
    assert all(a.dtype == F32 for a in jax.tree.leaves(dp))
    assert tree_err(hand, ref) < 2e-2, f"{name}: hand vs vjp {tree_err(hand, ref):.3g}"
    assert tree_err(hand, ref32) <= 2 * tree_err(ref, ref32) + 2 ** -8, \
        f"{name}: hand vs float32 {tree_err(hand, ref32):.3g}, autodiff {tree_err(ref, ref32):.3g}"


@pytest.mark.parametrize("spec,x_dtype", [("bfloat16", F32), ("bfloat16", jnp.float64),
                                           ("float16", F32), ("float32", BF16)])
def test_dx_comes_back_in_the_inputs_dtype(spec, x_dtype):
    """``dx`` of a mixed-precision model has the input's dtype, not ``compute``'s: from the hand
    path (``backward``), from autodiff of ``apply`` and from autodiff over the hand rules
    (``backprop.custom_vjp``); its values agree with the float32 model's to compute's
    precision."""
    model = serial(Dense(8), LayerNorm(), Dense(3))
    params, state, _ = model.init(K, (4, 5))
    params = to32(params)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 5)), x_dtype)
    dy = jnp.asarray(np.random.default_rng(6).standard_normal((4, 3)), F32)
    mixed = mixed_precision(model, spec)

    def all_three(params, x, dy):
        hand = mixed.backward(params, state, x, dy)[1]
        auto = REAL_VJP(lambda x: mixed.apply(params, state, x)[0], x)[1](dy)[0]
        over = backprop.custom_vjp(mixed)
        rules = REAL_VJP(lambda x: over.apply(params, state, x)[0], x)[1](dy)[0]
        ref = REAL_VJP(lambda x: model.apply(params, state, x)[0], to32(x))[1](dy)[0]
        return hand, auto, rules, ref
    hand, auto, rules, ref = jax.jit(all_three)(params, x, dy)
    for what, dx in (("hand", hand), ("autodiff", auto), ("custom_vjp", rules)):
        assert dx.dtype == x.dtype, f"{spec}, {x.dtype} input: {what} dx is {dx.dtype}"
        assert tree_err(dx, ref) < (3e-2 if spec != "float32" else 1e-2), what


def test_normalization_statistics_stay_float32():
    """LayerNorm of bfloat16 activations with a large common offset: standardized in float32,
    so the output matches float32 to bfloat16 rounding of the output (not of the statistics)."""
    x = 1000.0 + jnp.asarray(np.random.default_rng(0).standard_normal((4, 16)), F32)
    model = LayerNorm()
    params, state, _ = model.init(K, (4, 16))
    params = to32(params)
    y32, _ = model.apply(params, state, x)
    y16, _ = mixed_precision(model, "bfloat16").apply(params, state, x)
    # the bfloat16 input itself is rounded by up to 2^-8 · 1000 ≈ 4, so compare against the
    # float32 layer norm of the rounded input: only the statistics' precision is left
    ref, _ = model.apply(params, state, x.astype(BF16).astype(F32))
    assert np.max(np.abs(np.asarray(y16) - np.asarray(ref))) < 3e-2
    assert y16.dtype == F32 and y32.dtype == F32


def test_batch_norm_running_statistics_stay_float32():
    model = mixed_precision(serial(Dense(8), BatchNorm()), "bfloat16")
    params, state, _ = model.init(K, (16, 4))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4)), F32)
    _, new_state = model.apply(params, state, x, train=True)
    assert all(a.dtype == F32 for a in jax.tree.leaves(new_state))


def test_integer_inputs_stay_integers():
    from fnn.layers import Embedding
    model = mixed_precision(serial(Embedding(10, 4), Dense(3)), "bfloat16")
    params, state, _ = model.init(K, (2, 5))
    ids = jnp.arange(10).reshape(2, 5)
    y, _ = jax.jit(model.apply)(params, state, ids)
    assert y.dtype == F32
    (_, _), grads = jax.jit(backprop.value_and_grad(model, losses.mse))(
        params, state, ids, jnp.zeros((2, 5, 3), F32))
    assert all(g.dtype == F32 for g in jax.tree.leaves(grads))


def test_full_precision_marks_a_layer_float32_inside_bfloat16():
    seen = []
    inner = Softmax()
    spy = inner._replace(fwd=lambda p, s, x, **k: (seen.append(x.dtype), inner.fwd(
        p, s, x, **k))[1])
    model = mixed_precision(serial(Dense(6), full_precision(spy), Dense(2)), "bfloat16")
    params, state, _ = model.init(K, (3, 4))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)), F32)
    _, grads = jax.jit(backprop.value_and_grad(model, losses.mse))(params, state, x,
                                                                    jnp.zeros((3, 2), F32))
    assert seen == [F32]                          # the marked layer computed in float32
    ref = jax.jit(jax.grad(lambda p: losses.mse(model.apply(p, state, x)[0],
                                                jnp.zeros((3, 2), F32))))(params)
    assert tree_err(grads, ref) < 2e-2


def test_full_precision_leaves_integer_inputs_integers():
    """Token ids into a full_precision layer stay ids (not cast to float) and the output keeps
    the params' float dtype: the rows of the table, as NumPy indexes them."""
    from fnn.layers import Embedding
    model = full_precision(Embedding(10, 4))
    params, state, _ = model.init(K, (2, 3))
    ids = jnp.asarray([[1, 7, 3], [0, 9, 9]], jnp.int32)
    y, _ = model.apply(params, state, ids)
    assert y.dtype == params["w"].dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(params["w"])[np.asarray(ids)])


def test_mixed_precision_residuals_hold_no_more_than_the_inner_layers():
    """The dtype markers mixed_precision keeps for bwd are zero-size: its residuals hold as many
    elements as the wrapped layer's own."""
    inner = Dense(3)
    params, state, _ = inner.init(K, (2, 4))
    x = jnp.ones((2, 4), F32)
    size = lambda t: sum(np.size(a) for a in jax.tree.leaves(t))
    own = inner.fwd(jax.tree.map(lambda a: a.astype(BF16), params), state, x.astype(BF16))[2]
    res = mixed_precision(inner, "bfloat16").fwd(params, state, x)[2]
    assert size(res) == size(own) > 0


# --------------------------------------------------------------------------- loss scaling

def gradscaler(found_inf, scale=2.0 ** 15, growth=2000):
    """PyTorch GradScaler's update, transcribed: the scales seen before each step."""
    scales, good = [], 0
    for inf in found_inf:
        scales.append(scale)
        if inf:
            scale, good = scale * 0.5, 0
        else:
            good += 1
            if good == growth:
                scale, good = scale * 2.0, 0
    return scales + [scale]


def test_dynamic_loss_scale_follows_gradscaler():
    rng = np.random.default_rng(3)
    found_inf = list(rng.random(60) < 0.15) + [False] * 9 + [True] + [False] * 12
    ls, seen = loss_scale(), []
    step = jax.jit(lambda ls, inf: update_scale(ls, ~inf, growth_interval=5))
    for inf in found_inf:
        seen.append(float(ls.scale))
        ls = step(ls, jnp.asarray(inf))
    seen.append(float(ls.scale))
    assert seen == gradscaler(found_inf, growth=5)


def test_loss_scaling_rescues_float16_gradients_that_underflow():
    """A tiny loss (1e-4 · MSE of small errors) has float16 weight gradients ~1e-9, below
    float16's smallest subnormal: unscaled they are all zero; scaled by 2^15 and unscaled in
    float32 they match the float32 gradient."""
    model = Dense(4)
    params, state, _ = model.init(K, (8, 16))
    params = to32(params)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((8, 16)) * 1e-2, F32)
    t = model.apply(params, state, x)[0] + 1e-3
    loss = lambda y: 1e-4 * losses.mse(y, t)
    m16 = mixed_precision(model, "params=float32,compute=float16,output=float16")
    ref = jax.jit(jax.grad(lambda p: loss(model.apply(p, state, x)[0])))(params)
    plain = jax.jit(jax.grad(lambda p: loss(m16.apply(p, state, x)[0].astype(F32))))(params)
    assert float(jnp.max(jnp.abs(plain["w"]))) == 0.0             # underflowed
    ls = loss_scale()
    scaled = jax.jit(jax.grad(lambda p: scale_loss(loss(m16.apply(p, state, x)[0].astype(F32)),
                                                    ls)))(params)
    assert all_finite(scaled)
    assert tree_err(unscale(scaled, ls), ref) < 2e-2


def test_a_non_finite_gradient_is_caught():
    assert bool(all_finite({"a": jnp.ones(3), "b": jnp.zeros(2)}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([0.0, jnp.inf])}))
    assert not bool(all_finite([jnp.array([jnp.nan])]))


def test_loss_scale_rejects_a_non_positive_start():
    with pytest.raises(ValueError, match=r"initial scale must be positive, got 0"):
        loss_scale(0)


# --------------------------------------------------------------------------- float32 first

ILL = {"MultiHeadAttention", "TransformerBlock", "LayerNorm", "RMSNorm", "BatchNorm",
       "GroupNorm", "InstanceNorm"}
F32_CASES = [(n, i, ex, off) for n, i, ex in FIRST for off in (0.0, 100.0)
             if off == 0.0 or n in ILL]


GRADS = {}      # (name, i) -> jitted (autodiff, hand): two compilations per example (float64
                # reference, float32 run), shared by its plain and offset cases


def float_grads(name, i, layer, float_x):
    """``(jax.vjp of apply, backward)`` of one layer example, jitted once per example."""
    if (name, i) not in GRADS:
        def grads(params, state, x, dy, kw, key):
            f = lambda *a: layer.apply(a[0], state, a[1] if float_x else x, key=key, **kw)[0]
            auto = REAL_VJP(f, *((params, x) if float_x else (params,)))[1](dy)
            dp, dx = layer.backward(params, state, x, dy, key=key, **kw)
            return auto, ((dp, dx) if float_x else (dp,))
        GRADS[name, i] = jax.jit(grads)
    return GRADS[name, i]


@pytest.mark.parametrize("name,i,ex,offset", F32_CASES,
                         ids=[f"{n}-{'offset100' if o else 'plain'}" for n, _, _, o in F32_CASES])
def test_float32_hand_backward_is_as_accurate_as_autodiff(name, i, ex, offset, monkeypatch):
    """Low precision starts at float32: against the float64 gradient, the hand backward in
    float32 is no less accurate than autodiff in float32 (within 2× and one float32 ulp), on
    ordinary inputs and, for attention and normalization, on activations offset by 100."""
    layer, params, state, _, x, kw, key = setup(name, i, ex)
    x = jax.tree.map(lambda a: a + offset if is_float(a) else a, x)
    y = jax.eval_shape(lambda: layer.apply(params, state, x, key=key, **kw)[0])
    dy = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(i).standard_normal(a.shape),
                                            a.dtype), y)
    grads = float_grads(name, i, layer, all(is_float(a) for a in jax.tree.leaves(x)))
    with no_autodiff(monkeypatch):
        ref, _ = grads(params, state, x, dy, kw, key)
        auto, hand = grads(to32(params), to32(state), to32(x), to32(dy), to32(kw), key)
    e_hand, e_auto = tree_err(hand, ref), tree_err(auto, ref)
    assert e_hand <= 2 * e_auto + 2 ** -23, f"{name}: hand {e_hand:.3g}, autodiff {e_auto:.3g}"
