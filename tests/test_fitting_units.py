"""fnn.train.fitting's helpers called directly: the non-finite message, the argument checks,
the precision wrapper, the callback split and the replication on a one-device mesh."""
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnn import sharding
from fnn.layers import Dense
from fnn.precision import current_scale
from fnn.train import fitting
from fnn.train.callbacks import EarlyStopping
from fnn.train.loops import Bad
from fnn.train.resume import BackupAndRestore


def test_nonfinite_message_names_the_step_the_cause_and_the_state_kept():
    assert fitting._nonfinite_message(3, Bad(12, 2, True, True), 10) == (
        "fit: non-finite loss or gradient at epoch 3, step 12 (update 3 of the epoch); the "
        "inputs of that batch are finite, so the model or the optimizer diverged (lower the "
        "learning rate, clip the gradients); training stopped, keeping the state from before "
        "that step")
    assert fitting._nonfinite_message(1, Bad(4, 4, False, False), 0) == (
        "fit: non-finite loss or gradient at epoch 1, step 4 (update 5 of the epoch); the "
        "inputs of that batch hold NaN or Inf: a data problem, not the model; training "
        "stopped, but the parameters were already non-finite before it (an update that "
        "overflowed with a finite loss and gradient, or a train state given with non-finite "
        "values)")


@pytest.mark.parametrize("name, want", [("step", "fnn.train.Step"), ("loop", "fnn.train.Loop"),
                                        ("distribution", "fnn.sharding.Distribution")])
def test_check_args_names_the_option_of_the_wrong_type(name, want):
    args = dict(step=None, loop=None, distribution=None)
    args[name] = "fast"
    with pytest.raises(TypeError, match=rf"^fit: {name} must be a {want}\(\.\.\.\), got str$"):
        fitting._check_args(1, 8, False, **args)


def test_split_callbacks_takes_at_most_one_of_each():
    stop, backup, other = EarlyStopping(patience=2), BackupAndRestore("/tmp/x"), object()
    assert fitting._split_callbacks([other, backup, stop]) == ((other, stop), stop, backup)
    assert fitting._split_callbacks(iter([other])) == ((other,), None, None)
    for cbs, which in [([backup, BackupAndRestore("/tmp/y")], "BackupAndRestore"),
                       ([stop, EarlyStopping(patience=1), backup], "EarlyStopping")]:
        with pytest.raises(ValueError, match=rf"^fit: callbacks hold more than one {which}$"):
            fitting._split_callbacks(cbs)


def test_with_precision_wraps_the_model_and_scales_float16_losses():
    model, opt = Dense(2), optax.sgd(0.1)
    assert fitting._with_precision(model, opt, None, "autodiff") == (model, opt)
    with pytest.raises(ValueError, match=r"^fit: precision= needs grad='autodiff' or 'manual'; "
                                         r"a gradient function computes with the model it was "
                                         r"built from, not the mixed-precision one$"):
        fitting._with_precision(model, opt, "bfloat16", lambda *a, **k: None)
    params = model.init(jax.random.PRNGKey(0), (1, 3))[0]
    x = jnp.ones((1, 3))
    full = np.asarray(model.apply(params, {}, x)[0])
    for precision, scaled in [("bfloat16", False), ("float16", True)]:
        mixed, o = fitting._with_precision(model, opt, precision, "manual")
        low = np.asarray(mixed.apply(params, {}, x)[0])           # computed in 16 bits
        assert not np.array_equal(low, full) and np.allclose(low, full, rtol=1e-2)
        assert (current_scale(o.init(params)) is not None) == scaled and (o is opt) != scaled


def test_replicate_places_every_leaf_on_the_whole_mesh():
    mesh = sharding.make_mesh((1,), ("data",))
    tree = {"a": np.arange(3.0), "b": (np.ones(2, np.float32),)}
    got = fitting._replicate(SimpleNamespace(mesh=mesh))(tree)
    for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
        assert g.sharding == sharding.replicated(mesh)
        np.testing.assert_array_equal(np.asarray(g), want)


def _tiny_fit(epochs=3):
    from fnn import losses, optim, train
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3)
    t0 = time.perf_counter()
    res = train.fit(Dense(1), losses.mse, optim.sgd(0.1), (x, x[:, :1]), epochs=epochs,
                    batch_size=8, key=jax.random.PRNGKey(0), loop=train.Loop(progress=False))
    return res.history["time"], time.perf_counter() - t0


def test_history_time_is_the_epoch_runners_own_timing_when_it_has_one(monkeypatch):
    from fnn.train import loops
    monkeypatch.setattr(loops.InMemory, "take_time", lambda self: 7.25)   # a chain's mean
    assert _tiny_fit()[0] == [7.25, 7.25, 7.25]


def test_history_time_is_measured_on_the_host_otherwise(monkeypatch):
    from fnn.train import loops
    monkeypatch.setattr(loops.InMemory, "take_time", lambda self: None)
    times, wall = _tiny_fit()
    assert len(times) == 3 and all(isinstance(t, float) and 0 < t for t in times)
    assert sum(times) <= wall
