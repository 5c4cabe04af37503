"""fnn.gradcheck: finite differences against autodiff and hand-written gradients.

References are gradients written out by hand in NumPy from the formulas; every check is also
run against a deliberately wrong gradient to show it can fail, and where.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import losses
from fnn.combinators import serial
from fnn.gradcheck import GradcheckError, check_grad, check_model, numerical_grad
from fnn.layers import Dense, Tanh

from helpers import assert_trees_close


def _tree(rng):
    return {"dense": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))},
            "scale": np.float64(0.7)}


X = np.linspace(-1, 1, 6).reshape(2, 3)


def f_np(p):
    """``s · Σ sin(x w + b)²`` written in jnp; its gradient is spelled out in ``grad_np``."""
    z = jnp.asarray(X) @ p["dense"]["w"] + p["dense"]["b"][None, :]
    return p["scale"] * jnp.sum(jnp.sin(z) ** 2)


def grad_np(p):
    """Hand-derived: with z = xw + b, ∂/∂z = s·2 sin z cos z = s·sin 2z."""
    p = jax.tree.map(np.asarray, p)
    z = X @ p["dense"]["w"] + p["dense"]["b"][None, :]
    dz = p["scale"] * np.sin(2 * z)
    return {"dense": {"w": X.T @ dz, "b": dz.sum(0)}, "scale": np.sum(np.sin(z) ** 2)}


def test_numerical_grad_equals_hand_derived_gradient(rng):
    p = _tree(rng)
    fd, ref = numerical_grad(f_np, p), grad_np(p)
    assert_trees_close(fd, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", ["full", "directional"])
def test_correct_gradients_pass(rng, mode):
    p = _tree(rng)
    report = check_grad(f_np, p, grad_fn=grad_np, mode=mode)
    assert report.passed and report.mode == mode
    assert {r.source for r in report.rows} == {"jax.grad", "grad_fn"}
    leaves = {r.leaf for r in report.rows}
    assert {"['dense']['w']", "['dense']['b']", "['scale']"} <= leaves
    assert ("<global>" in leaves) == (mode == "directional")
    assert max(r.max_rel_err for r in report.rows) < 1e-7
    text = str(report)
    assert "gradcheck passed" in text and "['dense']['b']" in text and "FAIL" not in text


@pytest.mark.parametrize("mode", ["full", "directional"])
def test_wrong_gradient_fails_naming_the_leaf(rng, mode):
    p = _tree(rng)

    def wrong(q):                       # a 0.1% error in one bias entry only
        g = grad_np(q)
        g["dense"]["b"] = g["dense"]["b"] * np.array([1.0, 1.0, 1.001, 1.0])
        return g

    with pytest.raises(GradcheckError, match=r"grad_fn gradient of leaf \['dense'\]\['b'\]"
                       ) as info:
        check_grad(f_np, p, grad_fn=wrong, mode=mode)
    assert isinstance(info.value, AssertionError)
    report = info.value.report
    bad = {r.leaf for r in report.failures()}
    assert "['dense']['b']" in bad and bad <= {"['dense']['b']", "<global>"}
    assert all(r.passed for r in report.rows if r.source == "jax.grad")
    if mode == "full":
        row = next(r for r in report.failures() if r.leaf == "['dense']['b']")
        assert row.worst == "(2,)" and 5e-4 < row.max_rel_err < 2e-3
    assert "FAIL" in str(report)


def test_raise_on_fail_false_returns_the_report(rng):
    p = _tree(rng)
    report = check_grad(f_np, p, grad_fn=lambda q: jax.tree.map(lambda a: 2 * a, grad_np(q)),
                        autodiff=False, raise_on_fail=False)
    assert not report.passed and not report
    assert 0.3 < report.worst.max_rel_err < 0.6          # |g - 2g| / |2g| = 1/2


def test_tolerance_is_respected(rng):
    p = _tree(rng)
    with pytest.raises(GradcheckError):                  # finite differences are not exact
        check_grad(f_np, p, rtol=1e-15, atol=0.0)


def _big_f(p):
    h = jnp.tanh(jnp.asarray(XB) @ p["w1"])             # (8, 400)
    return jnp.sum((h @ p["w2"] + p["b"][None, :]) ** 2) / 8


XB = np.random.default_rng(1).normal(size=(8, 300))


def _big_params():
    r = np.random.default_rng(2)
    return {"w1": r.normal(size=(300, 400)) / 20, "w2": r.normal(size=(400, 400)) / 20,
            "b": r.normal(size=(400,))}


def test_directional_mode_scales_and_catches_a_transposed_gradient():
    p = _big_params()                                    # 280 400 parameters
    good = jax.jit(jax.grad(_big_f))
    report = check_grad(_big_f, p, grad_fn=good, autodiff=False)
    assert report.mode == "directional" and report.passed

    def transposed(q):                                   # the classic bug: dW = δ·aᵀ vs aᵀ·δ
        g = good(q)
        return {**g, "w2": g["w2"].T}

    with pytest.raises(GradcheckError, match=r"leaf \['w2'\]") as info:
        check_grad(_big_f, p, grad_fn=transposed, autodiff=False)
    bad = {r.leaf for r in info.value.report.failures()}
    assert "['w1']" not in bad and "['b']" not in bad


def test_users_own_function_with_integer_leaves_and_inputs():
    """A user's model over their own params: a tuple (params, x) checks both gradients; an
    integer step counter is held fixed."""
    r = np.random.default_rng(3)
    params = {"w": r.normal(size=(3, 2)), "step": jnp.array(5, jnp.int32)}
    x = r.normal(size=(4, 3))

    def loss(tree):
        p, x = tree
        return jnp.mean(jax.nn.softplus(x @ p["w"])) * (p["step"] + 1)

    def hand(tree):                                      # softplus' = sigmoid
        p, x = tree
        w, c = np.asarray(p["w"]), (int(p["step"]) + 1) / 8
        s = 1 / (1 + np.exp(-(np.asarray(x) @ w)))
        return ({"w": c * np.asarray(x).T @ s, "step": np.zeros((), np.int32)},
                c * s @ w.T)

    report = check_grad(loss, (params, x), grad_fn=hand)
    assert {row.leaf for row in report.rows} == {"[0]['w']", "[1]"}
    with pytest.raises(GradcheckError, match=r"leaf \[1\]"):
        check_grad(loss, (params, x), autodiff=False,
                   grad_fn=lambda t: (hand(t)[0], -hand(t)[1]))


def test_non_traceable_function_with_jit_false(rng):
    w = rng.normal(size=(5,))
    f = lambda p: float(np.sum(np.cos(np.asarray(p)) * np.arange(5)))   # NumPy, not JAX
    report = check_grad(f, w, grad_fn=lambda p: -np.sin(np.asarray(p)) * np.arange(5),
                        autodiff=False, jit=False)
    assert report.passed and report.rows[0].leaf == "<root>"


def broken_dense(features):
    """Dense whose backward forgets the bias gradient's batch sum (a plausible slip)."""
    d = Dense(features)

    def bwd(params, state, res, dy, *, key=None, train=False):
        g, dx = d.bwd(params, state, res, dy, key=key, train=train)
        return {**g, "b": dy[0]}, dx
    return d._replace(bwd=bwd)


def test_check_model_passes_and_names_a_broken_layer(key):
    x = jax.random.normal(key, (5, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    good = serial(Dense(4), Tanh(), Dense(2))
    p, s, _ = good.init(key, x.shape)
    assert check_model(good, losses.mse, p, s, x, y).passed
    bad = serial(Dense(4), Tanh(), broken_dense(2))
    with pytest.raises(GradcheckError, match=r"fnn.backprop gradient of leaf \['2'\]\['b'\]"):
        check_model(bad, losses.mse, p, s, x, y)


def test_float32_is_refused_unless_allowed(rng):
    with jax.enable_x64(False):
        p = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
        f = lambda q: jnp.sum(jnp.sin(q["w"]))
        with pytest.raises(RuntimeError, match="float64 is off.*jax_enable_x64"):
            check_grad(f, p)
        report = check_grad(f, p, allow_float32=True, grad_fn=lambda q: {"w": jnp.cos(q["w"])})
        assert report.passed and report.eps > 1e-3 and report.rtol >= 1e-2


def test_bad_calls_raise_clear_errors(rng):
    p = {"w": rng.normal(size=(3,))}
    with pytest.raises(ValueError, match="must return a scalar, got shape \\(3,\\)"):
        check_grad(lambda q: q["w"] * 2, p)
    with pytest.raises(GradcheckError, match="returned a tree of structure"):
        check_grad(lambda q: jnp.sum(q["w"]), p, grad_fn=lambda q: {"v": q["w"]})
    with pytest.raises(GradcheckError, match=r"leaf \['w'\] shape \(1, 3\).*shape \(3,\)"):
        check_grad(lambda q: jnp.sum(q["w"]), p, grad_fn=lambda q: {"w": q["w"][None]})
    with pytest.raises(ValueError, match="mode must be"):
        check_grad(lambda q: jnp.sum(q["w"]), p, mode="sometimes")
    with pytest.raises(ValueError, match="nothing to check"):
        check_grad(lambda q: jnp.sum(q["w"]), p, autodiff=False)
    with pytest.raises(ValueError, match="no floating-point leaves"):
        check_grad(lambda q: 1.0, {"n": jnp.arange(3)})
    with pytest.raises(TypeError, match=r"leaf \['z'\] is complex"):
        check_grad(lambda q: 1.0, {"z": jnp.ones(2, jnp.complex128)})
    with pytest.raises(ValueError, match="not finite"):
        check_grad(lambda q: jnp.sum(jnp.log(q["w"] * 0)), p)
