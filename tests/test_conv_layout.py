"""``canonical_convs``: every convolution of a program laid out as XLA:CPU's kernels take it
(benchmarks/RESULTS.md, "in a loop body"), with the values of the program as written."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fnn.layers._conv_layout import canonical_convs

CANONICAL = {1: "[b, 0, f]x[0, i, o]->[b, 0, f]", 2: "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]",
             3: "[b, 0, 1, 2, f]x[0, 1, 2, i, o]->[b, 0, 1, 2, f]"}


def conv_layouts(fun, *args):
    """The ``dim_numbers`` of every convolution in ``fun``'s program lowered for CPU."""
    return re.findall(r"dim_numbers = (\[[^]]*\]x\[[^]]*\]->\[[^]]*\])",
                      jax.jit(fun).lower(*args).as_text())


def spec(letters, order):
    return "".join(letters[i] for i in order)


# lhs / rhs / out layouts (permutations of the axes), feature and batch groups, strides,
# dilations: the convolution as written against the same one rewritten
CASES = [(1, (1, 2, 0), (2, 0, 1), (1, 0, 2), 1, 1, (2,), (1,)),
         (2, (3, 1, 2, 0), (2, 0, 1, 3), (1, 2, 0, 3), 1, 1, (1, 1), (1, 1)),   # a kernel gradient
         (2, (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2), 2, 1, (2, 1), (1, 2)),   # NCHW, OIHW
         (2, (3, 1, 2, 0), (2, 0, 1, 3), (1, 2, 0, 3), 1, 2, (1, 1), (2, 1)),   # batch groups
         (3, (0, 4, 1, 2, 3), (4, 3, 0, 1, 2), (4, 1, 2, 3, 0), 1, 1, (1, 2, 1), (1, 1, 1))]


@pytest.mark.parametrize("n, lo, ro, oo, fg, bg, strides, rhs_dil", CASES)
def test_any_layout_gives_the_same_values_in_the_canonical_one(n, lo, ro, oo, fg, bg, strides,
                                                               rhs_dil, rng):
    s = "DHW"[3 - n:]
    dn = (spec("N" + s + "C", lo), spec(s + "IO", ro), spec("N" + s + "C", oo))
    b, c, o, size, k = 4, 6, 4, 7, 3
    lhs_shape = dict(zip("N" + s + "C", (b, *[size] * n, c)))
    rhs_shape = dict(zip(s + "IO", (*[k] * n, c // fg, o)))
    x = rng.standard_normal([lhs_shape[a] for a in dn[0]])
    w = rng.standard_normal([rhs_shape[a] for a in dn[1]])

    def f(x, w):
        return lax.conv_general_dilated(x, w, strides, "SAME", rhs_dilation=rhs_dil,
                                        dimension_numbers=dn, feature_group_count=fg,
                                        batch_group_count=bg)
    want = jax.jit(f)(x, w)
    got = jax.jit(canonical_convs(f))(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert conv_layouts(canonical_convs(f), x, w) == [CANONICAL[n]]


def test_autodiff_kernel_gradients_in_loops_branches_and_calls(rng):
    """JAX's kernel gradient is a non-canonical convolution: rewritten where it stands, in a
    ``jit`` call, a ``scan`` body, a ``while_loop`` body and a ``cond`` branch."""
    x = rng.standard_normal((3, 6, 6, 2))
    w = rng.standard_normal((3, 3, 2, 4))
    conv = jax.jit(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    grad = jax.grad(lambda w, x: jnp.sum(jnp.tanh(conv(x, w))))

    def program(w, x):
        scanned = lax.scan(lambda w, _: (w - 0.1 * grad(w, x), None), w, None, length=2)[0]
        looped = lax.fori_loop(0, 2, lambda i, w: w - 0.1 * grad(w, x), w)
        branch = lax.cond(x[0, 0, 0, 0] > -10, lambda w: grad(w, x), lambda w: w, w)
        return grad(w, x), scanned, looped, branch
    assert set(conv_layouts(program, w, x)) - {CANONICAL[2]}      # the check can fail
    want = jax.jit(program)(w, x)
    got = jax.jit(canonical_convs(program))(w, x)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
    layouts = conv_layouts(canonical_convs(program), w, x)
    assert set(layouts) == {CANONICAL[2]}


def test_kernel_gradients_inside_a_remat_body(rng):
    """``jax.checkpoint`` (``stack(..., remat=True)``): the gradient recomputes the forward in
    the remat's own jaxpr, whose kernel gradient is rewritten there (it ran 40x slower in a
    loop before: benchmarks/RESULTS.md, seventh session); values as written."""
    x = rng.standard_normal((3, 6, 6, 2))
    w = rng.standard_normal((3, 3, 2, 4))
    block = jax.checkpoint(lambda x, w: jnp.tanh(lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))))
    grad = jax.grad(lambda w, x: jnp.sum(block(x, w) ** 2))

    def program(w, x):
        return grad(w, x), lax.fori_loop(0, 2, lambda i, w: w - 0.1 * grad(w, x), w)
    assert set(conv_layouts(program, w, x)) - {CANONICAL[2]}      # the check can fail
    for g, r in zip(jax.jit(canonical_convs(program))(w, x), jax.jit(program)(w, x)):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
    assert set(conv_layouts(canonical_convs(program), w, x)) == {CANONICAL[2]}
    assert "remat" in str(jax.make_jaxpr(canonical_convs(program))(w, x))   # still a remat


def test_the_rewritten_function_transforms_like_the_original(rng):
    x = rng.standard_normal((2, 5, 5, 3))
    w = rng.standard_normal((3, 3, 3, 2))

    def f(w, x):
        return jax.grad(lambda w: jnp.sum(lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2))(w)
    g = canonical_convs(f)
    np.testing.assert_allclose(jax.vmap(g, (None, 0))(w, x[:, None]),
                               jax.vmap(f, (None, 0))(w, x[:, None]), rtol=1e-12)
    t = rng.standard_normal(w.shape)
    np.testing.assert_allclose(jax.jvp(lambda w: g(w, x), (w,), (t,))[1],
                               jax.jvp(lambda w: f(w, x), (w,), (t,))[1], rtol=1e-12)
    np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(g(w, x) ** 2))(w),
                               jax.grad(lambda w: jnp.sum(f(w, x) ** 2))(w), rtol=1e-12)


def test_fits_autodiff_step_lays_out_jaxs_kernel_gradients(key, rng):
    """``make_step(grad="autodiff")``: JAX's gradient of a CNN, laid out for XLA:CPU (its
    update equal to a plain ``jax.grad`` SGD step's)."""
    from fnn import losses, optim, train
    from fnn.combinators import serial
    from fnn.layers import Conv, Dense, Flatten, Relu
    model = serial(Conv(3, (3, 3)), Relu(), Conv(2, (3, 3), strides=2), Flatten(), Dense(2))
    x, y = rng.standard_normal((4, 6, 6, 1)), jnp.array([0, 1, 1, 0])
    ts = train.create_train_state(model, optim.sgd(0.1), key, x.shape)
    step = train.make_step(model, losses.softmax_cross_entropy_with_integer_labels, optim.sgd(0.1), jit=False)
    assert set(conv_layouts(step, ts, (x, y))) == {CANONICAL[2]}

    def loss(p):
        return losses.softmax_cross_entropy_with_integer_labels(model.apply(p, ts.state, x, train=True)[0], y)
    want = jax.tree.map(lambda p, g: p - 0.1 * g, ts.params, jax.grad(loss)(ts.params))
    got = jax.jit(step)(ts, (x, y))[0].params
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
