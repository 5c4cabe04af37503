"""fnn.sharding on the suite's one device: per-shard shuffles, the interleaved placement that
reads batches in sequence, and the sharded step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import sharding

from helpers import assert_trees_close


def _mesh(shape=(1, 1), names=("data", "model")):
    return sharding.make_mesh(shape, names)


def test_shard_shuffle_permutes_within_shards(rng):
    """Each device's batches hold a permutation of that device's own rows, in NumPy terms."""
    n, d, b = 24, 4, 8
    x = np.arange(n)
    head, rest = sharding.shard_shuffle(jax.random.PRNGKey(3), x, d, b)
    assert head.shape == (d, n // b, b // d) and rest.shape == (0,)
    per = n // d
    for j in range(d):
        assert sorted(np.asarray(head[j]).ravel()) == list(range(j * per, (j + 1) * per))
    batch = np.asarray(sharding.take_batch(head, 1))
    np.testing.assert_array_equal(batch, np.asarray(head)[:, 1].ravel())
    head0, rest0 = sharding.shard_shuffle(None, np.arange(10), 2, 4)
    np.testing.assert_array_equal(np.asarray(sharding.take_batch(head0, 0)), [0, 1, 5, 6])
    np.testing.assert_array_equal(np.asarray(rest0), [4, 9])


@pytest.mark.parametrize("n, d, b", [(24, 4, 8), (28, 4, 8), (12, 2, 6), (16, 1, 5)])
def test_interleaved_placement_reads_batches_in_sequence(n, d, b):
    """Unshuffled, the sharded layout gives exactly the plain epoch's batches: data[i·B:(i+1)·B]
    and then the partial batch data[full·B:]."""
    if n % d or b % d:
        pytest.skip("layout needs multiples")
    x = np.arange(n) * 10
    head, rest = sharding.shard_shuffle(None, x[sharding.interleave_order(n, d, b)], d, b)
    for i in range(n // b):
        np.testing.assert_array_equal(np.asarray(sharding.take_batch(head, i)),
                                      x[i * b:(i + 1) * b])
    np.testing.assert_array_equal(np.asarray(rest), x[(n // b) * b:])
    with pytest.raises(ValueError, match=r"interleave_order: 10 examples and batch size 4 "
                                         r"must both be multiples of the 4 data shards"):
        sharding.interleave_order(10, 4, 4)


def test_sharded_step_equals_plain_step_and_donates(rng):
    from fnn import losses, optim
    from fnn.layers import Dense
    model, opt = Dense(3), optim.sgd(0.1)
    params = model.init(jax.random.PRNGKey(0), (4, 2))[0]
    x, t = jnp.asarray(rng.normal(size=(4, 2))), jnp.asarray(rng.normal(size=(4, 3)))

    def step(s, batch):
        g = jax.grad(lambda p: losses.mse(model.apply(p, {}, batch[0])[0], batch[1]))(s[0])
        upd, o = opt.update(g, s[1], s[0])
        return (jax.tree.map(jnp.add, s[0], upd), o), jnp.sum(g["w"])
    mesh = _mesh((1,), ("data",))
    s0 = (params, opt.init(params))
    sh = jax.tree.map(lambda _: sharding.replicated(mesh), s0)
    ref = jax.jit(step)(s0, (x, t))
    start = jax.device_put(jax.tree.map(jnp.copy, s0), sh)
    got = sharding.make_sharded_step(step, mesh, sh)(start, sharding.shard_batch((x, t), mesh))
    assert_trees_close(got, ref, rtol=0, atol=0)
    assert jax.tree.leaves(start)[0].is_deleted()        # the old state's buffers were donated
    kept = jax.device_put(jax.tree.map(jnp.copy, s0), sh)
    sharding.make_sharded_step(step, mesh, sh, donate=False)(kept, (x, t))
    assert not any(a.is_deleted() for a in jax.tree.leaves(kept))
