"""``all_finite`` (the step's guard without a gradient norm): small trees are checked joined
in one vector per dtype, large ones leaf by leaf; both must find one NaN or Inf anywhere."""
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.train import step


@pytest.mark.parametrize("size", [7, step._JOINED // 2 + 1])      # joined, then leaf by leaf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_in_any_leaf(size, bad):
    tree = {"a": jnp.ones((size,), jnp.float32), "b": jnp.full((size, 2), 3e38, jnp.float32),
            "c": jnp.ones((3,), jnp.bfloat16), "i": jnp.arange(4)}
    assert bool(step.all_finite(tree))          # large finite values: no overflow
    for name in ("a", "b", "c"):
        leaf = np.array(tree[name], np.float32)
        leaf.reshape(-1)[-1] = bad
        broken = dict(tree, **{name: jnp.asarray(leaf, tree[name].dtype)})
        assert not bool(step.all_finite(broken)), name
