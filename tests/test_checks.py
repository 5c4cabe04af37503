"""Labels and token ids out of range: eager errors, the data checks fit runs, the opt-in checked
mode under jit, and what the unchecked jit path returns (against NumPy references)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import checks, data, losses
from fnn.layers import Dense, Embedding, Flatten, parallel, serial
from fnn.models import GPT
from fnn.tasks import digits_cnn

INT = losses.softmax_cross_entropy_with_integer_labels
NAME = "softmax_cross_entropy_with_integer_labels"


def test_integer_label_loss_rejects_out_of_range_labels_eagerly():
    for labels, bad, index in (([1, 12], 12, (1,)), ([-1, 3], -1, (0,))):
        for f in (INT, INT.grad):
            with pytest.raises(ValueError, match=rf"{NAME}: label {bad} at index "
                               rf"\({index[0]},\) is outside the valid range \[0, 10\)"):
                f(jnp.zeros((2, 10)), jnp.array(labels))
    z = np.random.default_rng(0).standard_normal((3, 4))
    y = np.array([0, 3, 2])
    want = -np.mean(z[np.arange(3), y] - np.log(np.exp(z).sum(-1)))
    np.testing.assert_allclose(INT(jnp.asarray(z), jnp.asarray(y)), want, rtol=1e-12)


def test_embedding_rejects_out_of_range_ids_eagerly(key):
    emb = Embedding(5, 3)
    params, state, _ = emb.init(key, (2, 2))
    for ids, bad, index in (([[0, 1], [7, 2]], 7, r"\(1, 0\)"), ([[0, -1], [4, 2]], -1,
                                                                 r"\(0, 1\)")):
        with pytest.raises(ValueError, match=rf"Embedding\(5, 3\): token id {bad} at index "
                           rf"{index} is outside the valid range \[0, 5\)"):
            emb.apply(params, state, jnp.array(ids))
        with pytest.raises(ValueError, match=r"Embedding\(5, 3\): token id"):
            emb.backward(params, state, jnp.array(ids), jnp.ones((2, 2, 3)))
    ids = np.array([[0, 4], [3, 2]])
    y, _ = emb.apply(params, state, jnp.asarray(ids))
    np.testing.assert_array_equal(y, np.asarray(params["w"])[ids])


def test_unchecked_jit_path_does_what_the_docs_say(key):
    """Documented, not endorsed: under jit, without checked(), nothing is raised."""
    emb = Embedding(5, 3)
    params, state, _ = emb.init(key, (4,))
    w = np.asarray(params["w"])
    y, _ = jax.jit(emb.apply)(params, state, jnp.array([7, -1, -6, 2]))
    assert np.isnan(y[0]).all() and np.isnan(y[2]).all()        # >= vocab, < -vocab: NaN
    np.testing.assert_array_equal(y[1], w[4])                    # -1 wraps
    np.testing.assert_array_equal(y[3], w[2])
    value = jax.jit(lambda z, t: INT(z, t))(jnp.zeros((2, 10)), jnp.array([1, 12]))
    assert np.isnan(value)
    g = jax.jit(lambda z, t: INT.grad(z, t))(jnp.zeros((2, 10)), jnp.array([1, 12]))
    np.testing.assert_allclose(g[1], np.full(10, 0.1 / 2))       # softmax - zero one-hot


def test_checked_mode_under_jit_names_layer_value_and_index(key):
    emb = Embedding(5, 3)
    params, state, _ = emb.init(key, (2, 3))
    f = jax.jit(checks.checked(lambda p, x: emb.apply(p, state, x)[0]))
    err, _ = f(params, jnp.array([[0, 1, 2], [3, 9, 4]]))
    assert "Embedding(5, 3): token id 9 at index [1 1] is outside the valid range [0, 5)" \
        in err.get()
    with pytest.raises(Exception, match=r"token id 9"):
        err.throw()
    err, y = f(params, jnp.array([[0, 1, 2], [3, 4, 4]]))
    assert err.get() is None
    np.testing.assert_array_equal(y, np.asarray(params["w"])[[[0, 1, 2], [3, 4, 4]]])
    err, _ = jax.jit(checks.checked(lambda z, t: INT(z, t)))(jnp.zeros((3, 4)),
                                                             jnp.array([0, 3, 4]))
    assert f"{NAME}: label 4 at index [2] is outside the valid range [0, 4)" in err.get()
    err, _ = jax.jit(checks.checked(lambda z, t: INT.grad(z, t)))(jnp.zeros((3, 4)),
                                                                  jnp.array([0, -2, 1]))
    assert "label -2 at index [1]" in err.get()


def test_checked_mode_wraps_a_whole_training_objective_with_its_gradient(key):
    net = serial(Embedding(6, 2), Flatten(), Dense(3))
    params, state, _ = net.init(key, (4, 5))

    def objective(p, x, y):
        return INT(net.apply(p, state, x)[0], y)
    step = jax.jit(checks.checked(jax.value_and_grad(objective)))
    x = np.random.default_rng(0).integers(0, 6, size=(4, 5))
    err, (value, grads) = step(params, jnp.asarray(x), jnp.array([0, 2, 1, 2]))
    assert err.get() is None
    want_value, want_grads = jax.value_and_grad(objective)(params, jnp.asarray(x),
                                                           jnp.array([0, 2, 1, 2]))
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grads["0"]["w"], want_grads["0"]["w"], rtol=1e-12)
    err, _ = step(params, jnp.asarray(x), jnp.array([0, 2, 3, 2]))
    assert f"{NAME}: label 3 at index [2] is outside the valid range [0, 3)" in err.get()
    x[3, 4] = 6
    err, _ = step(params, jnp.asarray(x), jnp.array([0, 2, 1, 2]))
    assert "Embedding(6, 2): token id 6 at index [3 4]" in err.get()


@pytest.mark.parametrize("vocab, features", [(0, 3), (5, -1), (2.5, 3), (True, 3)])
def test_embedding_sizes_must_be_positive_ints(vocab, features):
    with pytest.raises(ValueError, match=r"Embedding: vocab and features must be positive ints"):
        Embedding(vocab, features)


def _digits():
    (x, y), _ = data.load_digits(image=True)
    return x, y


def test_check_data_finds_a_label_beyond_the_classes_of_the_digits_cnn():
    x, y = _digits()
    net = digits_cnn.model()
    checks.check_data(net, INT, x, y)                           # the real data pass
    y = y.copy()
    y[123] = 10
    with pytest.raises(ValueError, match=rf"{NAME}: label 10 at index \(123,\) is outside "
                       r"the valid range \[0, 10\) \(the model has 10 outputs\)"):
        checks.check_data(net, INT, x, y)
    checks.check_data(net, losses.mse, x[:4], np.full((4, 10), 99.0))  # not a label loss


def test_check_data_finds_token_ids_outside_the_embeddings_that_read_the_input():
    x = np.random.default_rng(0).integers(0, 5, size=(6, 4))
    y = np.zeros(6, np.int32)
    net = serial(Embedding(5, 3), Flatten(), Dense(2))
    checks.check_data(net, INT, x, y)
    x[4, 2] = 5
    with pytest.raises(ValueError, match=r"Embedding\(5, 3\): token id 5 at index \(4, 2\) "
                       r"is outside the valid range \[0, 5\)"):
        checks.check_data(net, INT, x, y)
    wide = serial(parallel(Embedding(9, 2), Embedding(5, 2), concat=True), Flatten(), Dense(2))
    with pytest.raises(ValueError, match=r"Embedding\(5, 2\): token id 5"):
        checks.check_data(wide, INT, x, y)
    gpt = GPT(7, 8, 2, 1, max_len=4)
    tokens = np.random.default_rng(1).integers(0, 7, size=(3, 4))
    checks.check_data(gpt, INT, tokens, tokens)
    tokens[2, 3] = 7
    with pytest.raises(ValueError, match=r"Embedding\(7, 8\): token id 7 at index \(2, 3\)"):
        checks.check_data(gpt, INT, tokens, np.zeros_like(tokens))
    with pytest.raises(ValueError, match=rf"{NAME}: label 7 at index \(2, 3\).*\[0, 7\)"):
        checks.check_data(gpt, INT, np.zeros_like(tokens), tokens)


def test_data_checker_checks_each_streamed_batch():
    x, y = _digits()
    check = checks.data_checker(digits_cnn.model(), INT, (32,) + x.shape[1:])
    y = y.copy()
    y[37] = -3
    for i, (xb, yb) in enumerate(data.batches((x, y), 32, shuffle=False)):
        if i == 1:
            with pytest.raises(ValueError, match=rf"batch 1: {NAME}: label -3 at index \(5,\)"):
                check(xb, yb, where="batch 1")
        else:
            check(xb, yb, where=f"batch {i}")


def test_fit_refuses_labels_outside_the_classes_before_training(key):
    from fnn import optim, train
    x = np.random.default_rng(0).standard_normal((8, 4))
    y = np.array([0, 1, 2, 0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=rf"{NAME}: label 3 at index \(6,\) is outside the "
                       r"valid range \[0, 3\)"):
        train.fit(serial(Dense(3)), INT, optim.sgd(0.1), (x, y), epochs=1, batch_size=4, key=key,
                  loop=train.Loop(progress=False))


def test_fit_checks_each_streamed_batch_and_token_ids(key):
    """Streaming: the batch holding the bad label is named; in memory: a token id past the
    vocabulary of the Embedding reading the input is refused before training."""
    from fnn import optim, train
    from fnn.layers import Embedding, Flatten
    x = np.random.default_rng(1).standard_normal((12, 4))
    y = np.array([0, 1, 2, 0] * 2 + [0, 5, 1, 2])
    batches = lambda epoch: ((x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4))
    with pytest.raises(ValueError, match=rf"batch 3 of the epoch\): {NAME}: label 5 at index "
                       r"\(1,\) is outside the valid range \[0, 3\)"):
        train.fit(serial(Dense(3)), INT, optim.sgd(0.1), batches, epochs=1, key=key,
                  loop=train.Loop(progress=False))
    ids = np.array([[0, 1], [2, 3], [4, 9]])
    with pytest.raises(ValueError, match=r"Embedding\(5, 2\): token id 9 at index \(2, 1\) is "
                       r"outside the valid range \[0, 5\)"):
        train.fit(serial(Embedding(5, 2), Flatten(), Dense(3)), INT, optim.sgd(0.1),
                  (ids, np.array([0, 1, 2])), epochs=1, batch_size=3, key=key,
                  loop=train.Loop(progress=False))
