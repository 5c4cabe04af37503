"""fnn.debug.checklist: the lesson's debugging checklist names each broken thing (``fnn doctor``,
the command that runs it on a task, is tested in test_cli.py).

Each broken model or data set below has one known fault; the test checks that the report names
it (and, for the healthy model, that nothing is flagged)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import debug, initializers, losses, serial
from fnn.core import Layer, from_backward
from fnn.layers import BatchNorm, Dense, Relu, Sigmoid

CE = losses.softmax_cross_entropy_with_integer_labels


def _data(rng, n=12, features=4, classes=3):
    return rng.normal(size=(n, features)), rng.integers(0, classes, size=n)


def _messages(report, check, severity):
    return [f.message for f in report.of(check) if f.severity == severity]


def test_a_healthy_model_passes_every_check(rng):
    model = serial(Dense(16), Relu(), Dense(3))
    report = debug.checklist(model, CE, _data(rng))
    assert report.passed and not report.warnings, str(report)
    assert [f.check for f in report.findings if f.severity == "ok"] == \
        ["data", "data", "size", "backward", "overfit"]
    assert "memorizes 10 examples" in str(report)


def test_dead_relus_from_a_bad_init_are_named_and_the_overfit_fails(rng):
    model = serial(Dense(16, b_init=initializers.constant(-50.0)), Relu(), Dense(3))
    report = debug.checklist(model, CE, _data(rng), checks=("gradients", "overfit"))
    dead = _messages(report, "gradients", "error")
    assert any("layer '1' (Relu): 16 of 16 units are zero on every example (dead ReLUs)" in m
               for m in dead), str(report)
    assert any("layer '0' gets no gradient at all" in m for m in dead)
    assert _messages(report, "overfit", "error")[0].startswith(
        "cannot drive the loss of 10 examples near zero")
    assert not report.passed


def test_unnormalized_inputs_are_named(rng):
    x, y = _data(rng)
    model = serial(Dense(3))
    report = debug.checklist(model, CE, (x * 60 + 128, y), checks=("data",))
    (msg,) = _messages(report, "data", "warning")
    assert msg.startswith("inputs are not normalized: feature") and "Standardize" in msg
    assert report.passed                                 # a warning, not an error
    tiny = debug.checklist(model, CE, (x * 1e-4, y), checks=("data",))
    assert "every feature has std below 0.01" in _messages(tiny, "data", "warning")[0]


def test_a_label_out_of_range_is_named_and_the_rest_skipped(rng):
    x, y = _data(rng)
    y[7] = 5
    report = debug.checklist(serial(Dense(3)), CE, (x, y))
    (msg,) = _messages(report, "data", "error")
    assert "label 5 at index (7,) is outside the valid range [0, 3)" in msg
    assert _messages(report, "overfit", "info") == ["skipped: fix the data errors first"]
    assert not report.passed


def test_non_finite_inputs_are_named(rng):
    x, y = _data(rng)
    x[3, 1] = np.nan
    report = debug.checklist(serial(Dense(3)), CE, (x, y), checks=("data",))
    assert _messages(report, "data", "error") == [
        "1 of 48 input values are NaN or infinite (the first at index (3, 1)): fix the data "
        "pipeline before anything else"]


def _wrong_scale() -> Layer:
    """``y = x ⊙ s`` whose hand backward forgets the ``x`` in ``ds = Σ dy ⊙ x``."""
    def init(key, input_shape):
        return {"s": jnp.full(input_shape[-1:], 1.5)}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        return x * params["s"][None, :], state

    def backward(params, state, x, dy, *, key=None, train=False):
        return {"s": jnp.sum(dy, axis=0)}, dy * params["s"][None, :]
    return from_backward(init, apply, backward, name="WrongScale")


def test_a_wrong_hand_backward_is_named(rng):
    model = serial(Dense(4), _wrong_scale(), Dense(3))
    report = debug.checklist(model, CE, _data(rng), checks=("backward",))
    (msg,) = _messages(report, "backward", "error")
    assert msg.startswith("the hand-derived gradient of '1/s' differs from jax.grad")
    assert "and from finite differences: the backward of the layer at '1' is wrong" in msg


def test_exploding_gradients_are_named(rng):
    model = serial(Dense(16, w_init=initializers.normal(300.0)), Relu(), Dense(3))
    report = debug.checklist(model, CE, _data(rng), checks=("gradients",))
    warnings = _messages(report, "gradients", "warning")
    assert any(m.startswith("layer '2': gradient norm") and "is exploding" in m
               for m in warnings), str(report)
    assert any(m.startswith("the loss at initialization") and "far above log(3)" in m
               for m in warnings)


def test_report_renders_and_unknown_checks_are_an_error(rng):
    report = debug.Report([debug.Finding("data", "error", "bad"),
                           debug.Finding("size", "ok", "fine")], title="t")
    assert str(report) == ("t: 1 error, 0 warnings\n  ERROR   data      bad\n"
                           "  ok      size      fine")
    with pytest.raises(ValueError, match="unknown checks \\['speed'\\]"):
        debug.checklist(serial(Dense(3)), CE, _data(rng), checks=("speed",))


def test_vanishing_gradients_are_named(rng):
    tiny = initializers.normal(1e-3)
    model = serial(Dense(8, w_init=tiny), Sigmoid(), Dense(8, w_init=tiny), Sigmoid(),
                   Dense(8, w_init=tiny), Sigmoid(), Dense(3))
    report = debug.checklist(model, CE, _data(rng), checks=("gradients",))
    assert any(m.startswith("layer '0': gradient norm") and "is vanishing" in m
               for m in _messages(report, "gradients", "warning")), str(report)


def test_a_check_that_raises_is_reported_and_state_comes_from_init(rng):
    x, y = _data(rng)
    model = serial(Dense(3))
    params, _, _ = model.init(jax.random.PRNGKey(0), (1, 5))          # 5 features, data has 4
    report = debug.checklist(model, CE, (x, y), params=params, checks=("size", "gradients"))
    (msg,) = _messages(report, "gradients", "error")
    assert msg == ("the check could not run: ValueError: serial[0] (Dense(3)): Dense: expected "
                   "input of shape (batch, ..., 5), got shape (12, 4)")
    assert _messages(report, "size", "ok") == ["18 parameters: small enough to debug"]  # 5·3 + 3
    bn = serial(Dense(4), BatchNorm(), Relu(), Dense(3))      # params given, state from init
    params, _, _ = bn.init(jax.random.PRNGKey(0), x.shape)
    assert debug.checklist(bn, CE, (x, y), params=params, checks=("gradients",)).passed


def test_initial_loss_is_shown_next_to_chance(rng, monkeypatch, capsys):
    """The report (and ``fnn doctor``'s output) puts the initial loss next to ``ln C``, the
    loss of uniform guesses over ``C`` classes: the loss is recomputed here in NumPy."""
    from fnn import cli, tasks
    x, y = _data(rng, classes=5)
    model = serial(Dense(5))
    params, state, _ = model.init(jax.random.PRNGKey(0), x.shape)
    z = x @ np.asarray(params["0"]["w"]) + np.asarray(params["0"]["b"])
    lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
    want = f"initial loss {float(np.mean(lse - z[np.arange(len(y)), y])):.4g}, chance ln 5 = 1.609;"
    task = tasks.Task("five-classes", "5 classes", None,
                      lambda seed=0: (model, CE, params, state, x, y))
    monkeypatch.setitem(tasks._TASKS, "five-classes", task)
    cli.main(["doctor", "five-classes", "--steps", "2"])
    assert want in capsys.readouterr().out
    mse = debug.checklist(model, losses.mse, (x, np.eye(5)[y]), params=params, state=state,
                          overfit_steps=2)
    assert "chance" not in " ".join(_messages(mse, "gradients", "info"))   # no classes: no ln C
