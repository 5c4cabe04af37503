"""Losses: values against float64 NumPy references for every reduction and weighting, the
hand-derived ``loss.grad`` against jax.grad, optax as a second reference, stability, bad input."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnn import losses as F

_R = np.random.default_rng(3)


def np_log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_huber(p, t, d):
    r = np.abs(p - t)
    return np.where(r <= d, 0.5 * r ** 2, d * (r - 0.5 * d))


def soft_targets(shape):
    """Soft targets whose rows do *not* sum to 1, so the ``softmax(z)·Σt`` term is exercised."""
    return _R.uniform(0.1, 1.0, shape)


ELEM = (4, 3)          # elementwise losses: pred, target and unreduced shape
CAT = (2, 3, 5)        # categorical: logits (2, 3, 5); unreduced shape (2, 3)
LABELS = _R.integers(0, 5, CAT[:-1])

# name -> (loss, pred, target, unreduced NumPy reference)
CASES = {
    "mse": (F.mse, _R.standard_normal(ELEM), _R.standard_normal(ELEM), lambda p, t: (p - t) ** 2),
    "mae": (F.mae, _R.standard_normal(ELEM), _R.standard_normal(ELEM), lambda p, t: np.abs(p - t)),
    "huber(0.7)": (F.huber(0.7), 1.5 * _R.standard_normal(ELEM), _R.standard_normal(ELEM),
                   lambda p, t: np_huber(p, t, 0.7)),
    "binary_cross_entropy": (
        F.binary_cross_entropy, _R.uniform(0.05, 0.95, ELEM), _R.uniform(0, 1, ELEM),
        lambda p, t: -(t * np.log(p) + (1 - t) * np.log(1 - p))),
    "sigmoid_binary_cross_entropy": (
        F.sigmoid_binary_cross_entropy, 3 * _R.standard_normal(ELEM), _R.integers(0, 2, ELEM) * 1.0,
        lambda z, t: -(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z))))),
    "softmax_cross_entropy": (
        F.softmax_cross_entropy, 2 * _R.standard_normal(CAT), soft_targets(CAT),
        lambda z, t: -(t * np_log_softmax(z)).sum(-1)),
    "softmax_cross_entropy_with_integer_labels": (
        F.softmax_cross_entropy_with_integer_labels, 2 * _R.standard_normal(CAT), LABELS,
        lambda z, y: -np.take_along_axis(np_log_softmax(z), y[..., None], -1)[..., 0]),
}
NAMES = list(CASES)
REDUCTIONS = ["mean", "sum", "none"]


def weightings(name):
    """None, per-example ``(batch,)`` and full unreduced-shape weights."""
    shape = CAT[:-1] if name.startswith("softmax") else ELEM
    return {"none": None, "per_example": _R.uniform(0.5, 2.0, shape[:1]),
            "full": _R.uniform(0.0, 2.0, shape)}


WEIGHTS = {n: weightings(n) for n in NAMES}


def np_reduce(l, w, reduction):
    if w is not None:
        w = np.broadcast_to(w.reshape(w.shape + (1,) * (l.ndim - w.ndim)), l.shape)
    wl = l if w is None else w * l
    if reduction == "none":
        return wl
    if reduction == "sum":
        return wl.sum()
    return l.mean() if w is None else wl.sum() / w.sum()


@functools.lru_cache(maxsize=None)
def results(name):
    """For one loss, every (reduction, weighting): value, hand grad, jax.grad — one compile."""
    loss, pred, target, _ = CASES[name]

    def run(pred, target, ws):
        out = {}
        for r in REDUCTIONS:
            for wn, w in ws.items():
                total = lambda p: jnp.sum(loss(p, target, w, r))   # "none": gradient of the sum
                out[r, wn] = (loss(pred, target, w, r), loss.grad(pred, target, w, r),
                              jax.grad(total)(pred))
        return out
    return jax.jit(run)(jnp.asarray(pred), jnp.asarray(target), WEIGHTS[name])


@pytest.mark.parametrize("weighting", ["none", "per_example", "full"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_value_matches_numpy(name, reduction, weighting):
    _, pred, target, ref = CASES[name]
    value = results(name)[reduction, weighting][0]
    expected = np_reduce(ref(pred, target), WEIGHTS[name][weighting], reduction)
    assert value.shape == np.shape(expected) and value.dtype == jnp.float64
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weighting", ["none", "per_example", "full"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_grad_matches_jax_grad(name, reduction, weighting):
    _, pred, _, _ = CASES[name]
    _, grad, auto = results(name)[reduction, weighting]
    assert grad.shape == pred.shape and grad.dtype == jnp.float64
    np.testing.assert_allclose(grad, auto, rtol=1e-11, atol=1e-15)


def test_zero_weights_mask_entries_out_of_the_mean():
    p, t = jnp.asarray([[1.0, 2.0], [3.0, 5.0]]), jnp.zeros((2, 2))
    np.testing.assert_allclose(F.mse(p, t, jnp.asarray([1.0, 0.0])), 2.5)
    np.testing.assert_allclose(F.mse.grad(p, t, jnp.asarray([1.0, 0.0])), [[1.0, 2.0], [0.0, 0.0]])


def test_lists_are_accepted():
    np.testing.assert_allclose(F.mse([1.0, 3.0], [0.0, 1.0]), 2.5)


OPTAX = [
    ("huber(0.7)", lambda p, t: optax.huber_loss(p, t, delta=0.7)),
    ("sigmoid_binary_cross_entropy", optax.sigmoid_binary_cross_entropy),
    ("softmax_cross_entropy", optax.softmax_cross_entropy),
    ("softmax_cross_entropy_with_integer_labels", optax.softmax_cross_entropy_with_integer_labels),
]


@pytest.mark.parametrize("name,ref", OPTAX, ids=[n for n, _ in OPTAX])
def test_unreduced_matches_optax(name, ref):
    _, pred, target, _ = CASES[name]
    np.testing.assert_allclose(results(name)["none", "none"][0],
                               ref(jnp.asarray(pred), jnp.asarray(target)), rtol=1e-12)


def test_float32_predictions_keep_float32():
    def run():
        out = {}
        for name, (loss, pred, target, _) in CASES.items():
            p = jnp.asarray(pred, jnp.float32)
            out[name] = loss(p, target), loss.grad(p, target, WEIGHTS[name]["full"], "sum")
        return out
    for name, (value, grad) in jax.jit(run)().items():
        assert value.dtype == jnp.float32 and grad.dtype == jnp.float32, name


# --------------------------------------------------------------------------- stability

def test_logit_losses_stable_at_1e4():
    z = jnp.asarray([-1e4, -1e4, 1e4, 1e4, 0.0])
    t = jnp.asarray([0.0, 1.0, 0.0, 1.0, 1.0])
    sb = F.sigmoid_binary_cross_entropy
    np.testing.assert_allclose(sb(z, t, reduction="none"), [0, 1e4, 1e4, 0, np.log(2)], rtol=1e-12)
    np.testing.assert_allclose(sb.grad(z, t, reduction="none"), [0, -1, 1, 0, -0.5], rtol=1e-12)

    logits = jnp.asarray([[1e4, 0.0, -1e4], [1e4, 0.0, -1e4], [-1e4, -1e4, -1e4]])
    y = jnp.asarray([0, 2, 1])
    ce = F.softmax_cross_entropy_with_integer_labels
    np.testing.assert_allclose(ce(logits, y, reduction="none"), [0, 2e4, np.log(3)], rtol=1e-12)
    g = ce.grad(logits, y, reduction="sum")
    np.testing.assert_allclose(g, [[0, 0, 0], [1, 0, -1], [1 / 3, -2 / 3, 1 / 3]], atol=1e-12)
    onehot = jax.nn.one_hot(y, 3, dtype=jnp.float64)
    np.testing.assert_allclose(F.softmax_cross_entropy(logits, onehot, reduction="none"),
                               [0, 2e4, np.log(3)], rtol=1e-12)
    np.testing.assert_allclose(F.softmax_cross_entropy.grad(logits, onehot, reduction="sum"), g,
                               atol=1e-12)


def test_binary_cross_entropy_finite_at_0_and_1():
    p, t = jnp.asarray([0.0, 1.0, 0.0, 1.0]), jnp.asarray([0.0, 1.0, 1.0, 0.0])
    v = F.binary_cross_entropy(p, t, reduction="none")
    assert bool(jnp.all(jnp.isfinite(v))) and bool(jnp.all(jnp.isfinite(
        F.binary_cross_entropy.grad(p, t))))
    np.testing.assert_allclose(v[:2], 0, atol=1e-11)
    np.testing.assert_allclose(v[2:], -np.log(1e-12), rtol=1e-6)     # clipped at 1e-12


# --------------------------------------------------------------------------- bad input

SAME_SHAPE = [(F.mse, "mse"), (F.mae, "mae"), (F.huber(1.0), "huber(1.0)"),
              (F.binary_cross_entropy, "binary_cross_entropy"),
              (F.sigmoid_binary_cross_entropy, "sigmoid_binary_cross_entropy"),
              (F.softmax_cross_entropy, "softmax_cross_entropy")]
INT = F.softmax_cross_entropy_with_integer_labels
INT_NAME = "softmax_cross_entropy_with_integer_labels"


@pytest.mark.parametrize("pshape,tshape", [((4, 3), (4, 1)), ((3,), (3, 1)), ((3, 1), (3,)),
                                           ((2, 3), (3, 2))])
@pytest.mark.parametrize("loss,name", SAME_SHAPE, ids=[n for _, n in SAME_SHAPE])
def test_mismatched_shapes_raise(loss, name, pshape, tshape):
    p, t = jnp.full(pshape, 0.5), jnp.full(tshape, 0.5)
    e = lambda v: re.escape(str(v))
    msg = rf"{e(name)}: pred shape {e(pshape)} and target shape {e(tshape)}"
    with pytest.raises(ValueError, match=msg):
        loss(p, t)
    with pytest.raises(ValueError, match=msg):
        loss.grad(p, t)


@pytest.mark.parametrize("lshape", [(4, 1), (5,), (4, 5), ()])
def test_labels_that_do_not_fit_raise(lshape):
    msg = rf"{INT_NAME}: labels of shape {re.escape(str(lshape))} do not fit logits of shape \(4, 5\)"
    with pytest.raises(ValueError, match=msg):
        INT(jnp.zeros((4, 5)), jnp.zeros(lshape, jnp.int32))
    with pytest.raises(ValueError, match=msg):
        INT.grad(jnp.zeros((4, 5)), jnp.zeros(lshape, jnp.int32))


def test_float_labels_raise():
    with pytest.raises(TypeError, match=rf"{INT_NAME}: labels must be integers, got float64"):
        INT(jnp.zeros((4, 5)), jnp.zeros((4,)))
    with pytest.raises(TypeError, match=rf"{INT_NAME}: labels must be integers, got float32"):
        INT.grad(jnp.zeros((4, 5)), np.zeros((4,), np.float32))


@pytest.mark.parametrize("bad", ["abc", {"a": 1}, None, object()],
                         ids=["str", "dict", "None", "object"])
def test_non_arrays_raise(bad):
    kind = type(bad).__name__
    with pytest.raises(TypeError, match=rf"mse: pred must be an array, got {kind}"):
        F.mse(bad, jnp.zeros(3))
    with pytest.raises(TypeError, match=rf"mse: target must be an array, got {kind}"):
        F.mse.grad(jnp.zeros(3), bad)
    with pytest.raises(TypeError, match=rf"{INT_NAME}: logits must be an array, got {kind}"):
        INT(bad, jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match=rf"{INT_NAME}: labels must be an array, got {kind}"):
        INT(jnp.zeros((3, 2)), bad)


def test_integer_predictions_raise():
    with pytest.raises(TypeError, match=r"mse: pred must be floating point, got int"):
        F.mse(jnp.zeros(3, jnp.int32), jnp.zeros(3))


@pytest.mark.parametrize("wshape", [(3,), (4, 3, 1), (3, 4)])
def test_weights_that_do_not_fit_raise(wshape):
    with pytest.raises(ValueError, match=rf"mse: weights of shape {re.escape(str(wshape))} do not "
                                         r"fit the unreduced loss of shape \(4, 3\)"):
        F.mse(jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.ones(wshape))
    with pytest.raises(ValueError, match=r"mse: weights of shape"):
        F.mse.grad(jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.ones(wshape))


def test_class_axis_weights_raise_for_categorical():
    with pytest.raises(ValueError, match=rf"{INT_NAME}: weights of shape \(4, 5\) .* shape \(4,\)"):
        INT(jnp.zeros((4, 5)), jnp.zeros(4, jnp.int32), jnp.ones((4, 5)))


def test_bad_reduction_and_scalar_logits_raise():
    with pytest.raises(ValueError, match=r"mse: reduction must be one of .*got 'avg'"):
        F.mse(jnp.zeros(3), jnp.zeros(3), reduction="avg")
    with pytest.raises(ValueError, match=r"mse: reduction must be one of"):
        F.mse.grad(jnp.zeros(3), jnp.zeros(3), reduction=None)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: logits need a class axis"):
        F.softmax_cross_entropy(jnp.zeros(()), jnp.zeros(()))
