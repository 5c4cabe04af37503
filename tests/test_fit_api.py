"""fit's signature: at most 15 parameters, every keyword removed in 0.2 refused with its
replacement named, and the option objects (Step, Loop, Distribution) checked when built."""
import inspect

import jax
import pytest

from helpers import xor_data

from fnn import losses, optim, sharding, train
from fnn.layers import Dense, Tanh, serial

CE = losses.softmax_cross_entropy_with_integer_labels
MODEL = serial(Dense(4), Tanh(), Dense(2))

# every keyword fit took in 0.1 that is gone, and a word of what the error must name
REMOVED = {"early_stopping": "EarlyStopping(", "min_delta": "EarlyStopping(",
           "monitor": "EarlyStopping(", "restore_best": "EarlyStopping(",
           "checkpoint_dir": "BackupAndRestore(", "resume": "BackupAndRestore(",
           "mesh": "Distribution(mesh)", "param_sharding": "Distribution(mesh, params=",
           "loss_scale": "loss_scaling(", "accuracy": "metrics=",
           "learning_rate": "optimizer state", "params": "create_train_state(",
           "state": "create_train_state(", "grad": "step=Step(grad=",
           "regularizer": "step=Step(regularizer=", "augment": "step=Step(augment=",
           "grad_norm": "step=Step(grad_norm=", "shuffle": "loop=Loop(shuffle=",
           "drop_last": "loop=Loop(drop_last=", "progress": "loop=Loop(progress=",
           "on_nonfinite": "loop=Loop(on_nonfinite=", "check_data": "loop=Loop(check_data=",
           "eval_batch_size": "loop=Loop(eval_batch_size=",
           "steps_per_epoch": "loop=Loop(steps_per_epoch=", "chunk": "loop=Loop(chunk="}


def test_signature_is_small_and_documented():
    params = inspect.signature(train.fit).parameters
    assert len(params) <= 15, list(params)
    assert not set(params) & set(REMOVED)
    from fnn.train._removed import RENAMED
    assert set(RENAMED) == set(REMOVED)            # this test covers every removed name
    page = open("docs/api/train.md").read()
    assert str(inspect.signature(train.fit)).split(" -> ")[0].replace(" ", "") in \
        page.replace(" ", "").replace("\n", "")
    for name in params:
        assert f"`{name}`" in page, name


@pytest.mark.parametrize("name", sorted(REMOVED))
def test_each_removed_keyword_names_its_replacement(name, key):
    with pytest.raises(TypeError, match=rf"fit: {name}= was removed in fnn 0\.2: {name}= -> "
                                        rf".*{__import__('re').escape(REMOVED[name])}"):
        train.fit(MODEL, CE, optim.sgd(0.1), xor_data(32), epochs=1, batch_size=8, key=key,
                  **{name: None})


def test_several_removed_keywords_in_one_error(key):
    with pytest.raises(TypeError, match=r"fit: shuffle=, mesh= were removed .*Loop.*"
                                        r"Distribution"):
        train.fit(MODEL, CE, optim.sgd(0.1), xor_data(32), epochs=1, batch_size=8, key=key,
                  shuffle=False, mesh=None)


def test_options_are_checked_when_built():
    with pytest.raises(ValueError, match="Step: grad must be 'autodiff', 'manual' or a "):
        train.Step(grad="bogus")
    with pytest.raises(TypeError, match="Step: augment must be a function"):
        train.Step(augment=3)
    with pytest.raises(ValueError, match="Loop: on_nonfinite must be 'stop' or 'raise'"):
        train.Loop(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="Loop: chunk must be a positive int, got 0"):
        train.Loop(chunk=0)
    with pytest.raises(ValueError, match="Loop: progress must be"):
        train.Loop(progress="bar")
    with pytest.raises(TypeError, match="unexpected keyword argument 'grad'"):
        train.Loop(grad="manual")                        # a Step field in a Loop
    assert train.Loop(shuffle=False) == train.Loop(shuffle=False)
    assert hash(train.Step(grad="manual")) == hash(train.Step(grad="manual"))
    with pytest.raises(ValueError, match="Distribution: mesh: mesh axis 'data' not in"):
        sharding.Distribution(sharding.make_mesh((1,), ("model",)))
    with pytest.raises(TypeError, match=r"fit: loop must be a fnn.train.Loop\(...\), got dict"):
        train.fit(MODEL, CE, optim.sgd(0.1), xor_data(32), epochs=1, batch_size=8,
                  key=jax.random.PRNGKey(0), loop={"shuffle": False})
    with pytest.raises(TypeError, match=r"fit: distribution must be a "
                                        r"fnn.sharding.Distribution\(...\), got Mesh"):
        train.fit(MODEL, CE, optim.sgd(0.1), xor_data(32), epochs=1, batch_size=8,
                  key=jax.random.PRNGKey(0), distribution=sharding.make_mesh((1,)))
