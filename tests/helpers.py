"""Helpers shared by the tests: tree comparisons, XOR data, autodiff-free backward checks, lesson
examples."""
import contextlib
import os

import jax
import numpy as np

# XLA:CPU flags that make the suite's many small compilations 2-4x cheaper (see conftest.py)
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

AUTODIFF = ("vjp", "grad", "jvp", "value_and_grad", "linearize", "linear_transpose", "jacrev",
            "jacfwd", "hessian")


@contextlib.contextmanager
def no_autodiff(monkeypatch, keep=()):
    """Make JAX's autodiff entry points raise while the block runs (``keep`` spares some), so a
    hand-derived backward traced inside cannot lean on them."""
    def boom(*a, **k):
        raise AssertionError("autodiff called inside a hand-derived backward")
    with monkeypatch.context() as m:
        for name in AUTODIFF:
            if name not in keep:
                m.setattr(jax, name, boom)
        yield


def rel_err(a, b):
    """Max absolute difference relative to the largest reference entry, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def tree_scale(t):
    """The largest absolute entry anywhere in a tree: the scale at which roundoff in a sum shows
    (an entry that cancels to near zero still carries the error of the terms it summed)."""
    return float(max((np.max(np.abs(np.asarray(x, np.float64))) for x in jax.tree.leaves(t)
                      if np.size(x)), default=0.0))


def tree_rel_err(a, b):
    """Max error over a tree relative to the largest reference entry anywhere in it (a leaf whose
    exact gradient is zero, such as an attention key bias, then compares at the scale of the
    others instead of at its own roundoff)."""
    return max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / max(tree_scale(b), 1e-12)


def _leaf_array(a):
    if hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return np.asarray(a)


def assert_trees_close(got, want, *, rtol, atol, what=""):
    """The tests' one tree comparison: the same tree structure, the same shape at every leaf, and
    every entry within NumPy's ``allclose`` bound, ``|got - want| <= atol + rtol * |want|``,
    computed in float64 (NaN matches NaN; typed PRNG keys compare their key data;
    ``rtol=atol=0`` is exact equality). Dtypes are not compared. A failure names the leaf's
    path (after ``what``) and its largest error."""
    assert jax.tree.structure(got) == jax.tree.structure(want), \
        f"{what}: structure {jax.tree.structure(got)} != {jax.tree.structure(want)}"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        where = f"{what}{jax.tree_util.keystr(path)}"
        a, b = _leaf_array(a), _leaf_array(b)
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        a, b = a.astype(np.float64), b.astype(np.float64)
        special = ~np.isfinite(a) | ~np.isfinite(b)        # NaN and ±inf must match exactly
        assert np.array_equal(a[special], b[special], equal_nan=True), \
            f"{where}: NaN or inf entries differ: got {a[special]}, want {b[special]}"
        a, b = np.where(special, 0.0, a), np.where(special, 0.0, b)
        err = np.abs(a - b)
        bad = err > atol + rtol * np.abs(b)
        if bad.any():
            i = np.unravel_index(np.argmax(np.where(bad, err, -1.0)), err.shape)
            raise AssertionError(f"{where}: {int(bad.sum())} of {bad.size} entries differ by "
                                 f"more than atol={atol:g} + rtol={rtol:g}·|want|; the largest "
                                 f"at {tuple(int(k) for k in i)}: got {float(a[i])!r}, want "
                                 f"{float(b[i])!r}")


def xor_data(n, seed=0, *, noise=0.1):
    """``n`` noisy XOR points (``fnn.data.xor``) as float64 JAX arrays:
    ``(x [n, 2], y [n] int32)``; ``xor_data(4, noise=0)`` is the truth table in order."""
    import jax.numpy as jnp

    from fnn import data
    x, y = data.xor(n, noise=noise, seed=seed, dtype=np.float64)
    return jnp.asarray(x), jnp.asarray(y)


def vjp_and_hand(f, args, dout, hand, monkeypatch):
    """``(jax.vjp of f, hand(*args, dout))`` in one jit, traced with autodiff patched to raise
    (the reference holds the real ``jax.vjp``, taken before the patch)."""
    real_vjp = jax.vjp

    def both(args, dout):
        return real_vjp(f, *args)[1](dout), hand(*args, dout)
    with no_autodiff(monkeypatch):
        return jax.jit(both)(args, dout)


def check_pair(layer, params, state, x, dy, monkeypatch, **kw):
    """A layer's residual pair: ``fwd``'s y and state equal ``apply``'s; ``bwd`` of its
    residuals (arrays only) equals ``backward`` and jax.vjp of ``apply`` (float64, autodiff
    patched to raise while the hand rules are traced, one jit)."""
    assert layer.fwd is not None and layer.bwd is not None
    real_vjp, not_arrays = jax.vjp, []

    def run(params, x, dy):
        y, s = layer.apply(params, state, x, **kw)
        y2, s2, res = layer.fwd(params, state, x, **kw)
        # residual leaves as fwd returns them: at trace time a Python number or a NumPy array
        # still shows as one (jit's outputs would all be arrays)
        not_arrays.extend(type(a).__name__ for a in jax.tree.leaves(res)
                          if not isinstance(a, jax.Array))
        ref = real_vjp(lambda p, x: layer.apply(p, state, x, **kw)[0], params, x)[1](dy)
        return (y, s), (y2, s2), layer.bwd(params, state, res, dy, **kw), ref, \
            layer.backward(params, state, x, dy, **kw)
    with no_autodiff(monkeypatch):
        (y, s), (y2, s2), got, ref, back = jax.jit(run)(params, x, dy)
    assert not not_arrays, f"residuals include {not_arrays}"
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)
    assert jax.tree.structure(s2) == jax.tree.structure(s)
    jax.tree.map(np.testing.assert_array_equal, s2, s)
    assert tree_rel_err(got, ref) < 1e-9
    assert tree_rel_err(got, back) < 1e-12


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"lesson_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_figure(path, name=None):
    """A lesson figure: written, a real PNG's size, under the pages' 150 KB (and ``name.png``)."""
    assert name is None or os.path.basename(path) == f"{name}.png", path
    assert os.path.isfile(path) and 1_000 < os.path.getsize(path) < 150_000, path


TRACES = []


def counted_ce(pred, target, **kw):
    """Softmax cross-entropy on integer labels that counts how often JAX traces it (it runs only
    while tracing): ``len(TRACES)`` before and after a call tells whether it compiled anew."""
    from fnn import losses
    TRACES.append(1)
    return losses.softmax_cross_entropy_with_integer_labels(pred, target, **kw)


counted_ce.name = "softmax_cross_entropy_with_integer_labels"


def numpy_perceptron(x, y, epochs=100, lr=1.0):
    """Rosenblatt's perceptron rule as the lesson writes it (zero init, one sample at a time),
    in float64 NumPy: ``(w, b)``."""
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(epochs):
        for xi, yi in zip(x, y):
            update = lr * (yi - (1 if xi @ w + b > 0 else 0))
            w, b = w + update * xi, b + update
    return w, b


class CrashAt:
    """A ``fit`` callback that raises in epoch ``at`` (listed last: the other callbacks have run
    for that epoch, the backup has not), like a process killed between a callback's write and
    the backup."""

    def __init__(self, at):
        self.at = at

    def __call__(self, epoch, train_state, logs):
        if epoch == self.at:
            raise RuntimeError(f"crash after epoch {epoch}")


def random_params(model, shape, seed=0, scale=0.4):
    """``model``'s params with every leaf random: ``scale``·N(0, 1), plus the initial value for
    vectors (biases and norm offsets nonzero, norm scales away from 1); and its state."""
    params, state, _ = model.init(jax.random.PRNGKey(seed), shape)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [scale * jax.random.normal(k, a.shape, a.dtype) + (a if a.ndim == 1 else 0)
              for k, a in zip(keys, leaves)]
    return jax.tree.unflatten(tree, leaves), state


def greedy_reference(model, params, state, prompt, length):
    """Greedy decoding without a cache, the reference for ``generate``: ``prompt`` extended to
    ``length`` tokens, each the argmax of the full causal forward's logits at the position
    before it (one compiled forward over the whole fixed-length sequence)."""
    full = jax.jit(lambda s: model.apply(params, state, s)[0])
    n = prompt.shape[1]
    seq = np.zeros((prompt.shape[0], length), np.int32)
    seq[:, :n] = np.asarray(prompt)
    for t in range(n, length):
        seq[:, t] = np.argmax(np.asarray(full(seq))[:, t - 1], -1)
    return seq
