"""``fnn.train.predict``: batched eval-mode outputs against one unbatched ``model.apply``
(float64), one program for every batch, tuple outputs, the precision policy (and
``evaluate``'s), and its errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import losses, train
from fnn.layers import BatchNorm, Dense, Dropout, Tanh, parallel, serial
from fnn.precision import mixed_precision
from fnn.train.predicting import make_predict

N = 10


def _net():
    """Eval mode matters here: dropout is off, batch norm uses the running statistics (in
    train mode the outputs would depend on the batch and on a key)."""
    net = serial(Dense(8), BatchNorm(), Dropout(0.5), Tanh(), Dense(3))
    params, state, _ = net.init(jax.random.PRNGKey(0), (N, 5))
    # running statistics away from their initial 0 / 1, so eval-mode batch norm is not identity
    state = jax.tree.map(lambda s: 1.5 * s + 0.3, state)
    x = np.random.default_rng(0).normal(size=(N, 5))
    return net, params, state, x


def _reference(net, params, state, x):
    return np.asarray(net.apply(params, state, jnp.asarray(x, jnp.float64), train=False)[0])


@pytest.mark.parametrize("batch_size", [1, 3, 5, 10, 512])
def test_predict_matches_one_unbatched_apply(batch_size):
    """Batch sizes that divide ``N`` (1, 5, 10), that do not (3: the last batch of 1 padded),
    and larger than ``N`` (one batch of ``N``); NumPy input, float64 throughout."""
    net, params, state, x = _net()
    want = _reference(net, params, state, x)
    got = train.predict(net, params, state, x, batch_size=batch_size)
    assert got.shape == (N, 3) and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
    # and the train-mode outputs are something else (the check above can tell them apart)
    key = jax.random.PRNGKey(1)
    train_mode = net.apply(params, state, jnp.asarray(x), train=True, key=key)[0]
    assert np.max(np.abs(np.asarray(train_mode) - want)) > 1e-3


def test_predict_one_program_for_every_batch_and_jax_input():
    """10 examples in batches of 4: batches 4, 4, 2 (padded to 4) run one compiled program."""
    net, params, state, x = _net()
    run = make_predict(net)
    before = run._cache_size()
    got = train.predict(net, params, state, jnp.asarray(x), batch_size=4)
    assert run._cache_size() - before == 1
    np.testing.assert_allclose(np.asarray(got), _reference(net, params, state, x),
                               rtol=1e-12, atol=1e-12)
    # a second call with an equal (freshly built) model reuses it
    net2 = serial(Dense(8), BatchNorm(), Dropout(0.5), Tanh(), Dense(3))
    train.predict(net2, params, state, x, batch_size=4)
    assert run._cache_size() - before == 1


def test_predict_tuple_output():
    net = parallel(Dense(2), serial(Dense(4), Tanh()))
    params, state, _ = net.init(jax.random.PRNGKey(2), (N, 3))
    x = np.random.default_rng(1).normal(size=(N, 3))
    want = net.apply(params, state, jnp.asarray(x), train=False)[0]
    got = train.predict(net, params, state, x, batch_size=3)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        assert g.shape == (N,) + w.shape[1:]
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)


def test_predict_model_kwargs_are_batched_with_x():
    """A per-example keyword (here ``lengths=`` of an LSTM over padded sequences) is cut into
    the same batches as ``x``."""
    from fnn.layers import LSTM
    net = LSTM(4)
    x = np.random.default_rng(3).normal(size=(7, 6, 2))
    lengths = np.array([6, 1, 3, 6, 2, 5, 4])
    params, state, _ = net.init(jax.random.PRNGKey(3), x.shape)
    want = net.apply(params, state, jnp.asarray(x), train=False, lengths=jnp.asarray(lengths))[0]
    got = train.predict(net, params, state, x, batch_size=3, lengths=lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


def test_predict_precision_is_mixed_precision():
    """``precision="bfloat16"`` gives ``mixed_precision(model, "bfloat16")``'s outputs (float32
    out, bfloat16 inside), visibly not the full-precision ones."""
    net, params, state, x = _net()
    params32, state32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, state))
    x32 = x.astype(np.float32)
    want = mixed_precision(net, "bfloat16").apply(params32, state32, jnp.asarray(x32))[0]
    got = train.predict(net, params32, state32, x32, batch_size=3, precision="bfloat16")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    full = _reference(net, params, state, x)
    assert np.max(np.abs(np.asarray(got) - full)) > 1e-4


def test_evaluate_takes_the_same_precision():
    net, params, state, x = _net()
    params32, state32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, state))
    x32 = x.astype(np.float32)
    y = np.arange(N) % 3
    loss = losses.softmax_cross_entropy_with_integer_labels
    logits = mixed_precision(net, "bfloat16").apply(params32, state32, jnp.asarray(x32))[0]
    want = float(loss(logits, jnp.asarray(y)))
    got = train.evaluate(net, loss, params32, state32, (x32, y), batch_size=4, metrics=(),
                         precision="bfloat16")["loss"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = train.evaluate(net, loss, params, state, (x, y), batch_size=4, metrics=())["loss"]
    assert abs(plain - want) > 1e-5


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8", None])
def test_predict_bad_batch_size_is_named(bad):
    net, params, state, x = _net()
    with pytest.raises(ValueError, match=r"predict: batch_size must be a positive int, got"):
        train.predict(net, params, state, x, batch_size=bad)


def test_predict_errors_name_predict():
    net, params, state, x = _net()
    with pytest.raises(ValueError, match="predict: x has 0 examples"):
        train.predict(net, params, state, x[:0])
    with pytest.raises(ValueError, match="predict: every array needs the same leading"):
        train.predict(net, params, state, x, lengths=np.ones(N - 1))
    with pytest.raises(ValueError, match="predict: precision='bfloat17'"):
        train.predict(net, params, state, x, precision="bfloat17")
    with pytest.raises(ValueError, match="evaluate: precision='bfloat17'"):
        train.evaluate(net, losses.softmax_cross_entropy_with_integer_labels, params, state,
                       (x, np.arange(N) % 3), precision="bfloat17")
