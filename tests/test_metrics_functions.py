"""The metric functions of ``fnn.train.metrics`` called directly (no fit, a few tiny programs)
against NumPy: per-example shapes over sequence axes, one-hot targets, dtypes, and which accuracy
``"auto"`` picks for each loss."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from fnn import losses
from fnn.train import metrics as M

RNG = np.random.default_rng(0)
PRED = RNG.standard_normal((4, 3, 5))                        # [batch, time, classes]
LABELS = RNG.integers(0, 5, (4, 3))
LABELS[0] = PRED[0].argmax(-1)                               # example 0: every step right


def test_categorical_accuracy_per_example_with_labels_and_one_hot():
    want = (PRED.argmax(-1) == LABELS).mean(axis=1)          # [batch]
    assert want[0] == 1.0 and len(set(want)) > 1
    for target in (LABELS, np.eye(5)[LABELS]):
        got = M.categorical_accuracy(jnp.asarray(PRED), jnp.asarray(target))
        assert got.shape == (4,) and got.dtype == M.default_dtype()
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=0)


def test_mean_absolute_error_per_example_in_preds_dtype():
    pred = RNG.standard_normal((4, 2, 3)).astype(np.float32)
    target = RNG.integers(-2, 3, (4, 2, 3))                   # integer targets are cast
    got = M.mean_absolute_error(jnp.asarray(pred), jnp.asarray(target))
    want = np.abs(pred.astype(np.float64) - target).reshape(4, -1).mean(axis=1)
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("loss,threshold", [
    (losses.sigmoid_binary_cross_entropy, 0.0), (losses.binary_cross_entropy, 0.5)])
def test_auto_accuracy_of_the_binary_losses_uses_their_threshold(loss, threshold):
    pred = np.array([[-0.2], [0.3], [0.7], [0.9]])
    target = np.array([[0.0], [1.0], [1.0], [1.0]])     # 0, 0.5, 1: 1, 0.75, 0.25
    want = ((pred > threshold) == (target > 0.5)).astype(float)[:, 0]
    (metric,) = M.resolve_metrics(loss, "auto")
    assert metric.name == "accuracy"
    s = metric.stats(jnp.asarray(pred), jnp.asarray(target), jnp.ones(4))
    assert float(metric.result(s)) == pytest.approx(want.mean(), abs=0)


def test_accuracy_fn_defaults_to_auto_and_keeps_a_function():
    ce = losses.softmax_cross_entropy_with_integer_labels
    assert M.accuracy_fn(ce) is M.categorical_accuracy
    assert M.accuracy_fn(ce, M.mean_absolute_error) is M.mean_absolute_error
    assert M.accuracy_fn(ce, None) is None
    nameless = lambda pred, target: jnp.mean((pred - target) ** 2)
    assert M.accuracy_fn(nameless) is None and M.resolve_metrics(nameless) == ()


def _macro_f1(labels, guess):
    """Mean over the classes in the labels or the guesses of 2tp / (2tp + fp + fn)."""
    f1 = [2 * np.sum((guess == c) & (labels == c)) / (np.sum(guess == c) + np.sum(labels == c))
          for c in np.union1d(labels, guess)]
    return np.mean(f1)


def test_macro_f1_over_sequence_steps_with_one_hot_targets_and_padding():
    """[batch, time, classes] predictions; example 3 is padding (weight 0) for every step."""
    w = np.array([1.0, 1.0, 1.0, 0.0])
    want = _macro_f1(LABELS[:3].reshape(-1), PRED[:3].argmax(-1).reshape(-1))
    assert want != pytest.approx(_macro_f1(LABELS.reshape(-1), PRED.argmax(-1).reshape(-1)))
    for target in (LABELS, np.eye(5)[LABELS]):
        s = M.macro_f1.stats(jnp.asarray(PRED), jnp.asarray(target), jnp.asarray(w))
        assert float(M.macro_f1.result(s)) == pytest.approx(want, rel=1e-12)


def test_macro_f1_counts_a_class_seen_once():
    """Classes 1 (one label, never predicted) and 2 (predicted once, never a label) have F1 0
    and count in the mean."""
    labels, guess = np.array([0, 0, 1]), np.array([0, 0, 2])
    s = M.macro_f1.stats(jnp.asarray(np.eye(3)[guess]), jnp.asarray(labels), jnp.ones(3))
    assert float(M.macro_f1.result(s)) == pytest.approx(_macro_f1(labels, guess)) == 1 / 3


def test_macro_f1_of_a_single_class_seen_is_its_f1():
    labels = np.zeros(4, int)                              # one class, always right: F1 1
    s = M.macro_f1.stats(jnp.asarray(np.eye(3)[labels]), jnp.asarray(labels), jnp.ones(4))
    assert float(M.macro_f1.result(s)) == 1.0


def test_named_accuracy_needs_a_classification_loss():
    ce = losses.softmax_cross_entropy_with_integer_labels
    assert [m.name for m in M.resolve_metrics(ce, ["acc", "accuracy"])] == ["accuracy"]
    with pytest.raises(ValueError, match=r"needs a classification loss .*got 'mse'"):
        M.resolve_metrics(losses.mse, ["accuracy"])
    def my_loss(pred, target):
        return jnp.mean(pred)
    with pytest.raises(ValueError, match=r"got <function .*my_loss"):
        M.resolve_metrics(my_loss, ["accuracy"])


def test_metric_names_and_their_aliases():
    got = M.resolve_metrics(losses.mse, ["mean_absolute_error", "mae", "f1", "macro_f1",
                                         "top_3_accuracy"])
    assert [m.name for m in got] == ["mean_absolute_error", "macro_f1", "top3_accuracy"]
    assert got[1] is M.macro_f1


def test_functions_and_metrics_in_the_list():
    """A per-example function becomes the weighted mean named after it (a callable with no
    __name__: "metric"); a Metric is kept as is; anything else is a TypeError naming its type."""
    pred, target = RNG.standard_normal((4, 2)), RNG.standard_normal((4, 2))
    w = np.array([1.0, 0.0, 1.0, 1.0])
    unnamed = functools.partial(M.mean_absolute_error)
    mae, other, f1 = M.resolve_metrics(losses.mse, [M.mean_absolute_error, unnamed, M.macro_f1])
    assert (mae.name, other.name, f1) == ("mean_absolute_error", "metric", M.macro_f1)
    per = np.abs(pred - target).mean(axis=1)
    for m in (mae, other):
        s = m.stats(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(w))
        assert float(m.result(s)) == pytest.approx(np.sum(per * w) / 3, rel=1e-12)
    with pytest.raises(TypeError, match=r"a name, a Metric or a function .*got int"):
        M.resolve_metrics(losses.mse, [5])
