"""The combinators: serial shape inference and shape errors, parallel/residual/stack forward
and backward against jax.vjp, stack == unrolled copies, keyword routing, key folding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.combinators import parallel, residual, serial, stack
from fnn.core import child_key
from fnn.layers import Flatten, Relu, Tanh

from fake_layers import (K, Dense, Drop, Masked, Noise, Scaled, check_backward, key_hash,
                         normal, np_dense)
from helpers import assert_trees_close


# --------------------------------------------------------------------------- serial

def test_serial_infers_shapes_through_a_stack():
    model = serial(Flatten(), Dense(6), Tanh(), Dense(3), Relu(), Dense(2))
    params, state, out = model.init(K, (4, 2, 5))
    assert out == (4, 2)
    assert jax.tree.map(jnp.shape, params) == {
        "0": {}, "1": {"w": (10, 6), "b": (6,)}, "2": {}, "3": {"w": (6, 3), "b": (3,)}, "4": {},
        "5": {"w": (3, 2), "b": (2,)}}
    assert state == {str(i): {} for i in range(6)}
    x = normal((4, 2, 5))
    y, _ = model.apply(params, state, x)
    h = np.tanh(np_dense(np.asarray(x).reshape(4, 10), params["1"]))
    h = np.maximum(np_dense(h, params["3"]), 0)
    np.testing.assert_allclose(y, np_dense(h, params["5"]), rtol=1e-12)


def test_serial_named_children():
    model = serial(("enc", Dense(4)), ("act", Relu()), ("head", Dense(2)))
    params, _, _ = model.init(K, (3, 5))
    assert list(params) == ["enc", "act", "head"]
    with pytest.raises(ValueError, match=r"child names must be unique, got \['a', 'a'\]"):
        serial(("a", Dense(2)), ("a", Dense(2)))
    with pytest.raises(TypeError, match=r"expected a Layer or a \(name, Layer\) pair at position 1, "
                                        r"got function"):
        serial(Dense(2), lambda x: x)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4)])
def test_serial_backward_matches_vjp(shape):
    check_backward(serial(Dense(6), Tanh(), Dense(3)), normal(shape))


def test_serial_backward_jits():
    model = serial(Dense(6), Tanh(), Dense(3))
    params, state, _ = model.init(K, (4, 5))
    x, dy = normal((4, 5)), normal((4, 3), 2)
    assert_trees_close(jax.jit(model.backward)(params, state, x, dy),
                       model.backward(params, state, x, dy), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mismatched_input_at_apply_names_layer_and_shapes(jit):
    model = serial(Dense(4), Relu(), Dense(2))
    params, state, _ = model.init(K, (3, 5))
    apply = jax.jit(model.apply) if jit else model.apply
    with pytest.raises(ValueError, match=r"Dense: expected input of shape \(batch, \.\.\., 5\), "
                                         r"got shape \(3, 6\)"):
        apply(params, state, jnp.ones((3, 6)))
    with pytest.raises(ValueError, match=r"Dense.*5.*got shape \(3, 6\)"):
        model.backward(params, state, jnp.ones((3, 6)), jnp.ones((3, 2)))


@pytest.mark.parametrize("model,msg", [
    (serial(Dense(4), residual(Dense(5))),
     r"serial\[1\] \(residual\(Dense\(5\)\)\): .*\(2, 4\) to \(2, 5\)"),
    (serial(Dense(4), stack(Dense(3), 2)),
     r"serial\[1\] \(stack\(Dense\(3\), 2\)\): .*\(2, 4\) to \(2, 3\)"),
    (serial(Dense(4), serial(Relu(), ("head", residual(Dense(2))))),
     r"serial\[1\] \(serial\): serial\[head\] \(residual\(Dense\(2\)\)\): .*\(2, 4\) to \(2, 2\)"),
], ids=["residual", "stack", "nested"])
def test_mismatched_shapes_at_init_name_layer_and_shapes(model, msg):
    with pytest.raises(ValueError, match=msg):
        model.init(K, (2, 3))


def test_rank_error_at_init_names_the_layer():
    with pytest.raises(ValueError, match=r"serial\[0\] \(Dense\(3\)\): Dense: expected input shape "
                                         r"\(\.\.\., features\), got \(\)"):
        serial(Dense(3)).init(K, ())


# --------------------------------------------------------------------------- parallel, residual

def test_parallel_tuple_forward_and_backward():
    model, x = parallel(Dense(3), serial(Dense(4), Tanh())), normal((2, 5))
    params, state, out = model.init(K, (2, 5))
    assert out == ((2, 3), (2, 4))
    (ya, yb), _ = model.apply(params, state, x)
    np.testing.assert_allclose(ya, np_dense(x, params["0"]), rtol=1e-12)
    np.testing.assert_allclose(yb, np.tanh(np_dense(x, params["1"]["0"])), rtol=1e-12)
    check_backward(model, x)


@pytest.mark.parametrize("concat,out", [(True, (2, 7)), (-1, (2, 7)), (0, (4, 3))])
def test_parallel_concat_forward_and_backward(concat, out):
    model = parallel(Dense(3), Dense(4) if out[1] == 7 else Dense(3), concat=concat)
    params, state, shape = model.init(K, (2, 5))
    assert shape == out
    x = normal((2, 5))
    y, _ = model.apply(params, state, x)
    parts = [np_dense(x, params["0"]), np_dense(x, params["1"])]
    np.testing.assert_allclose(y, np.concatenate(parts, axis=concat if concat is not True else -1),
                               rtol=1e-12)
    check_backward(model, x)


def test_parallel_concat_shape_error():
    with pytest.raises(ValueError, match=r"parallel: cannot concatenate outputs of shapes "
                                         r"\[\(2, 3\), \(2, 4\)\] along axis 0"):
        parallel(Dense(3), Dense(4), concat=0).init(K, (2, 5))


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5)])
def test_residual_forward_and_backward(shape):
    x = normal(shape)
    params, y = check_backward(residual(serial(Dense(5), Tanh())), x)
    np.testing.assert_allclose(y, np.asarray(x) + np.tanh(np_dense(x, params["0"])), rtol=1e-12)


def test_residual_shape_error():
    with pytest.raises(ValueError, match=r"residual\(Dense\(4\)\): the wrapped layer maps shape "
                                         r"\(2, 3\) to \(2, 4\)"):
        residual(Dense(4)).init(K, (2, 3))


# --------------------------------------------------------------------------- stack

N = 3
BLOCK = serial(Dense(4), Tanh())


def unrolled(params):
    """The stack's params split into the per-copy dict of an unrolled serial."""
    return {str(i): jax.tree.map(lambda a: a[i], params) for i in range(N)}


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_stack_equals_unrolled_copies(remat):
    model, ref = stack(BLOCK, N, remat=remat), serial(*[BLOCK] * N)
    params, state, out = model.init(K, (2, 4))
    assert out == (2, 4)
    assert jax.tree.map(jnp.shape, params) == {"0": {"w": (N, 4, 4), "b": (N, 4)}, "1": {}}
    rp, rs, _ = ref.init(K, (2, 4))
    # copy i initialised from fold_in(key, i)
    assert_trees_close(unrolled(params), rp, rtol=0, atol=0)
    x, dy = normal((2, 4)), normal((2, 4), 2)
    y, _ = model.apply(params, state, x)
    np.testing.assert_allclose(y, ref.apply(rp, rs, x)[0], rtol=1e-12)
    dp, dx = model.backward(params, state, x, dy)
    rdp, rdx = ref.backward(rp, rs, x, dy)
    assert_trees_close(unrolled(dp), rdp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10)
    g = jax.grad(lambda p: jnp.sum(model.apply(p, state, x)[0] * dy))(params)
    assert_trees_close(unrolled(g), rdp, rtol=1e-10, atol=1e-12)


def test_stack_backward_matches_vjp():
    check_backward(stack(BLOCK, N), normal((2, 3, 4)))


def test_stack_of_a_parameter_free_layer():
    model = stack(Tanh(), 2)
    params, state, _ = model.init(K, (2, 3))
    x = normal((2, 3))
    np.testing.assert_allclose(model.apply(params, state, x)[0], np.tanh(np.tanh(x)), rtol=1e-12)
    model.backward(params, state, x, x)


def test_stack_errors():
    with pytest.raises(ValueError, match=r"stack: n must be a positive int, got 0"):
        stack(Dense(3), 0)
    with pytest.raises(ValueError, match=r"stack\(Dense\(3\)\): a stacked layer must keep its "
                                         r"input shape, but maps \(2, 4\) to \(2, 3\)"):
        stack(Dense(3), 2).init(K, (2, 4))


# --------------------------------------------------------------------------- keywords

B, T, F = 3, 4, 2
LENGTHS, SCALE = jnp.asarray([4, 1, 2]), jnp.asarray([2.0, -1.0, 0.5])
MASK = (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None])[:, :, None]


def test_serial_routes_keywords_to_the_children_that_take_them():
    # each child's apply/backward takes exactly its own keywords: any other one would raise
    model = serial(Dense(F), Masked(), Scaled(), Dense(F))
    assert model.keywords == frozenset({"lengths", "scale"})
    x = normal((B, T, F))
    params, y = check_backward(model, x, lengths=LENGTHS, scale=SCALE)
    h = np_dense(x, params["0"]) * MASK * np.asarray(SCALE)[:, None, None]
    np.testing.assert_allclose(y, np_dense(h, params["3"]), rtol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: parallel(Masked(), Scaled()),
    lambda: parallel(Dense(F), Masked(), Scaled(), concat=True),
    lambda: residual(serial(Masked(), Dense(F), Scaled())),
    lambda: stack(serial(Dense(F), Masked(), Scaled()), 2),
    lambda: serial(Dense(F), serial(Masked(), Tanh()), Scaled()),
], ids=["parallel", "parallel-concat", "residual", "stack", "nested"])
def test_combinators_route_keywords(make):
    model = make()
    assert model.keywords == frozenset({"lengths", "scale"})
    check_backward(model, normal((B, T, F)), lengths=LENGTHS, scale=SCALE)


def test_unknown_keyword_raises_type_error():
    model = serial(Dense(F), Masked())
    params, state, _ = model.init(K, (B, T, F))
    x = normal((B, T, F))
    with pytest.raises(TypeError, match=r"serial: unexpected keyword\(s\) \['mask'\]; this model "
                                        r"takes \['lengths'\]"):
        model.apply(params, state, x, lengths=LENGTHS, mask=None)
    with pytest.raises(TypeError, match=r"serial: unexpected keyword\(s\) \['mask'\]"):
        model.backward(params, state, x, x, mask=None)
    plain = serial(Dense(F))
    p, s, _ = plain.init(K, (B, T, F))
    with pytest.raises(TypeError, match=r"serial: unexpected keyword\(s\) \['lengths'\]; this "
                                        r"model takes none"):
        plain.apply(p, s, x, lengths=LENGTHS)
    with pytest.raises(TypeError, match=r"parallel: unexpected keyword"):
        parallel(Dense(F)).apply({"0": p["0"]}, {"0": {}}, x, lengths=LENGTHS)


# --------------------------------------------------------------------------- keys

def noise(key, shape):
    return np.asarray(key_hash(key, shape) & 0xFFFF) / 65536


def test_serial_parallel_stack_fold_the_key_per_child():
    x, k = normal((2, 3)), jax.random.PRNGKey(42)
    f = lambda i, kk=k: noise(jax.random.fold_in(kk, i), (2, 3))
    for model, expected in [
        (serial(Noise(), Noise()), x + f(0) + f(1)),
        (stack(Noise(), 3), x + f(0) + f(1) + f(2)),
        (serial(Tanh(), serial(Noise())), np.tanh(x) + f(0, jax.random.fold_in(k, 1))),
    ]:
        params, state, _ = model.init(K, (2, 3))
        np.testing.assert_allclose(model.apply(params, state, x, key=k, train=True)[0], expected,
                                   rtol=1e-12)
    model = parallel(Noise(), Noise())
    params, state, _ = model.init(K, (2, 3))
    (y0, y1), _ = model.apply(params, state, x, key=k)
    np.testing.assert_allclose(y0, x + f(0), rtol=1e-12)
    np.testing.assert_allclose(y1, x + f(1), rtol=1e-12)
    assert child_key(None, 3) is None


@pytest.mark.parametrize("make", [
    lambda: serial(Dense(5), Drop(), Dense(5), Drop()),      # all masks (4, 5): one compile
    lambda: parallel(serial(Dense(5), Drop()), Drop()),
    lambda: residual(serial(Drop(), Dense(5))),
    lambda: stack(serial(Dense(5), Drop()), 3),
], ids=["serial", "parallel", "residual", "stack"])
def test_stochastic_backward_sees_the_forward_masks(make):
    model = make()
    assert model.stochastic and not serial(Dense(3), Relu()).stochastic
    assert not stack(Dense(3), 2).stochastic and not parallel(Dense(3)).stochastic
    x = normal((4, 5))
    check_backward(model, x, key=jax.random.PRNGKey(3), train=True)
    params, state, _ = model.init(K, (4, 5))
    with pytest.raises(ValueError, match=r"Drop: train=True needs a key"):
        model.apply(params, state, x, train=True)
