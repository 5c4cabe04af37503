"""Shared sweep over every public layer constructor in ``fnn.layers``.

Each constructor declares example constructions with ``@fnn.examples``. For every example:
hand-derived ``backward``, and ``bwd`` of ``fwd``'s residuals, against ``jax.vjp`` of
``apply`` (float64, every entry within 1e-10 of itself plus 1e-12 of the tree's largest, tree
structures equal) in train and eval mode, with
autodiff patched to raise while they run; ``fwd`` equal to ``apply``; residuals arrays only;
``vmap`` over a leading axis equal to separate calls; ``jit`` equal to eager; ``init``'s
inferred output shape equal to the real one; params free of state.
A new layer without examples, or with a wrong backward, fails here without anyone adding a test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn.layers
from fnn.core import Layer, is_shape

from helpers import assert_trees_close, no_autodiff, tree_scale

CONSTRUCTORS = sorted(n for n in fnn.layers.__all__ if n[:1].isupper() and n != "Activation")
CASES = [(n, i, ex) for n in CONSTRUCTORS
         for i, ex in enumerate(getattr(getattr(fnn.layers, n), "examples", ()))]


def normal(key, shape):
    """Standard normal float64 draw seeded by ``key``; NumPy's, since an eager
    ``jax.random.normal`` compiles anew for every shape."""
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def build(name, ex):
    layer = getattr(fnn.layers, name)(*ex.args, **ex.kwargs)
    assert isinstance(layer, Layer), f"{name} did not return a Layer"
    return layer


def make_input(ex, key):
    def one(k, shape):
        if ex.make_input is not None:
            return ex.make_input(k, shape, jnp.float64)
        return normal(k, shape)
    shape = ex.input_shape
    if isinstance(shape, tuple) and shape and isinstance(shape[0], tuple):
        return tuple(one(jax.random.fold_in(key, i), s) for i, s in enumerate(shape))
    return one(key, shape)


def call_kwargs(ex, key):
    return {} if ex.call_kwargs is None else ex.call_kwargs(jax.random.fold_in(key, 99),
                                                             ex.input_shape)


def shapes_of(y):
    return tuple(y.shape) if hasattr(y, "shape") else tuple(shapes_of(a) for a in y)


def norm_shape(s):
    return tuple(s) if is_shape(s) else tuple(norm_shape(a) for a in s)


def is_float(x):
    return jnp.issubdtype(x.dtype, jnp.floating)


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_every_constructor_declares_examples(name):
    assert getattr(getattr(fnn.layers, name), "examples", ()), \
        f"fnn.layers.{name} has no @examples(...) — the sweep cannot check its backward"


def setup(name, i, ex):
    """The layer of example ``i``, its params/state, an input, call keywords and key."""
    layer = build(name, ex)
    k_init, k_x, k_call = jax.random.split(jax.random.PRNGKey(i), 3)
    params, state, out_shape = layer.init(k_init, ex.input_shape)
    x = make_input(ex, k_x)
    kw = call_kwargs(ex, k_x)
    key = k_call if layer.stochastic else None
    return layer, params, state, out_shape, x, kw, key


def assert_grads_close(name, what, got, want):
    """Same tree structure (a missing tuple element fails) and shapes; every entry within 1e-10
    of itself plus 1e-12 of the tree's largest entry (an entry that cancels to near zero carries
    the roundoff of what it summed). Stricter than each leaf's max error < 1e-9 of its largest
    entry for every leaf above 1/900 of the tree's scale (the sweep's smallest is 1/14); the
    sweep's worst case needs 2e-15 of the tree's scale, 500 times under the bound."""
    assert_trees_close(got, want, rtol=1e-10, atol=1e-12 * tree_scale(want), what=f"{name} {what}")


def plant_nan(x):
    """Two NaNs in the first float input: at flat index 1 and at the last entry (one of them
    reaches the output of a layer that reads only part of its input: ``SelectToken(-1)``, a
    ``VALID`` window that drops the last row)."""
    leaves, treedef = jax.tree.flatten(x)
    for j, a in enumerate(leaves):
        if is_float(a):
            leaves[j] = a.ravel().at[jnp.array([1, a.size - 1])].set(jnp.nan).reshape(a.shape)
            break
    return jax.tree.unflatten(treedef, leaves)


def nonfinite(t):
    return [bool((~np.isfinite(np.asarray(a))).any()) for a in jax.tree.leaves(t)
            if a is not None and jnp.issubdtype(a.dtype, jnp.inexact)]


def hand_and_reference(layer, params, state, x, kw, key, dy, train, monkeypatch, also=()):
    """In one jit (one compilation per case and mode; eager op-by-op dispatch compiled every
    primitive anew): ``apply``, ``jax.vjp`` of ``apply`` (the real one, taken before the patch),
    ``backward``, and ``bwd`` of ``fwd``'s residuals, the hand rules traced with
    autodiff patched to raise. Also returns the type names of residual leaves that were not
    arrays when ``fwd`` returned them (checked at trace time, where a Python number or a
    NumPy array would still show as such), and the same call's results for each input in
    ``also`` (same shapes: no compilation)."""
    real_vjp, not_arrays = jax.vjp, []
    float_x = all(is_float(a) for a in jax.tree.leaves(x))

    def run(params, state, x, dy, kw, key):
        out = layer.apply(params, state, x, key=key, train=train, **kw)
        f = lambda p, x: layer.apply(p, state, x, key=key, train=train, **kw)[0]
        if float_x:
            ref = real_vjp(f, params, x)[1](dy)
        else:
            ref = (real_vjp(lambda p: f(p, x), params)[1](dy)[0], None)
        back = layer.backward(params, state, x, dy, key=key, train=train, **kw)
        y2, state2, res = layer.fwd(params, state, x, key=key, train=train, **kw)
        not_arrays.extend(type(a).__name__ for a in jax.tree.leaves(res)
                          if not isinstance(a, jax.Array))
        bwd = layer.bwd(params, state, res, dy, key=key, train=train, **kw)
        return out, (y2, state2), ref, back, bwd
    with no_autodiff(monkeypatch):
        f = jax.jit(run)
        return (f(params, state, x, dy, kw, key), not_arrays,
                [f(params, state, a, dy, kw, key) for a in also])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,i,ex", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_backward_matches_vjp(name, i, ex, train, monkeypatch):
    """``backward`` and ``bwd`` of ``fwd``'s residuals against ``jax.vjp`` of ``apply``;
    ``fwd``'s output and new state equal ``apply``'s; residuals are arrays only. In eval mode
    the same compiled call with a NaN planted in the input (:func:`plant_nan`): the output is
    not finite, and each gradient leaf of ``backward`` and ``bwd`` is non-finite wherever
    ``jax.vjp``'s is (no layer swallows a NaN; see tests/test_nan_propagation.py)."""
    layer, params, state, _, x, kw, key = setup(name, i, ex)
    y_shape = jax.eval_shape(lambda: layer.apply(params, state, x, key=key, train=train, **kw))[0]
    dy = jax.tree.map(lambda a: normal(jax.random.PRNGKey(7), a.shape).astype(a.dtype), y_shape)
    float_x = all(is_float(a) for a in jax.tree.leaves(x))
    nan_x = () if train or not any(is_float(a) for a in jax.tree.leaves(x)) else (plant_nan(x),)
    ((y, new_state), (y2, state2), (ref_p, ref_x), (dp, dx), (dp2, dx2)), not_arrays, nans = \
        hand_and_reference(layer, params, state, x, kw, key, dy, train, monkeypatch, nan_x)
    for (yn, _), _, ref, *hands in nans:
        assert any(nonfinite(yn)), f"{name}: a NaN input entry gives a finite output"
        for hand, how in zip(hands, ("backward", "bwd")):
            for what, r, h in (("dparams", ref[0], hand[0]), ("dx", ref[1], hand[1])):
                for j, (rn, hn) in enumerate(zip(nonfinite(r), nonfinite(h))):
                    assert hn or not rn, (f"{name}: jax.vjp's {what} leaf {j} is non-finite, "
                                          f"{how}'s is finite (it swallowed the NaN)")

    assert_trees_close((y2, state2), (y, new_state), rtol=1e-12, atol=1e-12,
                       what=f"{name}: fwd != apply")
    assert not not_arrays, f"{name}: residuals include {not_arrays}"
    for what, (gp, gx) in (("backward", (dp, dx)), ("bwd", (dp2, dx2))):
        assert_grads_close(name, f"{what} dparams", gp, ref_p)
        if float_x:
            assert_grads_close(name, f"{what} dx", gx, ref_x)
        else:
            assert gx is None, f"{name}: {what} dx must be None for a non-float input"


@pytest.mark.parametrize("name,i,ex", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_vmap_over_a_leading_axis(name, i, ex):
    """``vmap`` of ``apply`` and ``backward`` over two stacked inputs equals two calls (eval;
    the batched and the separate calls in one jit, one compilation per case)."""
    layer, params, state, _, x, kw, key = setup(name, i, ex)
    xs = jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), x)
    kws = jax.tree.map(lambda a: jnp.stack([a, a]), kw)

    def run(xs, kws, kw):
        apply = lambda x, kw: layer.apply(params, state, x, key=key, **kw)[0]
        back = lambda x, dy, kw: layer.backward(params, state, x, dy, key=key, **kw)
        ys = jax.vmap(apply)(xs, kws)
        dys = jax.tree.map(lambda a: a * 0.5 + 1.0 if is_float(a) else a, ys)
        pick = lambda t, j: jax.tree.map(lambda a: a[j], t)
        each = [(apply(pick(xs, j), kw), back(pick(xs, j), pick(dys, j), kw)) for j in range(2)]
        return ys, jax.vmap(back)(xs, dys, kws), each
    ys, grads, each = jax.jit(run)(xs, kws, kw)
    for j, (y, want) in enumerate(each):
        pick = lambda t: jax.tree.map(lambda a: a[j], t)
        assert_trees_close(pick(ys), y, rtol=1e-10, atol=1e-12, what=f"{name} vmap y[{j}]")
        assert_trees_close(pick(grads), want, rtol=1e-9, atol=1e-12, what=f"{name} vmap grads[{j}]")


@pytest.mark.parametrize("name,i,ex", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_jit_equals_eager_and_shape_inference(name, i, ex):
    layer, params, state, out_shape, x, kw, key = setup(name, i, ex)
    for train in (False, True):
        eager, _ = layer.apply(params, state, x, key=key, train=train, **kw)
        jitted, _ = jax.jit(lambda p, s, x, k, kw: layer.apply(p, s, x, key=k, train=train, **kw))(
            params, state, x, key, kw)
        assert_trees_close(eager, jitted, rtol=1e-10, atol=1e-12, what=f"{name} jit != eager")
    assert shapes_of(eager) == norm_shape(out_shape), \
        f"{name}: init inferred {out_shape}, apply gave {shapes_of(eager)}"
    # params must hold no state: both are plain pytrees of arrays
    for leaf in jax.tree.leaves((params, state)):
        assert isinstance(leaf, jax.Array)


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_kind_and_structural_identity(name):
    """Every public constructor is a ``@constructor``: its layers' ``kind`` is its name, and
    two layers built from the same arguments are equal and hash alike (one compiled epoch);
    a different example's layer is a different layer."""
    exs = getattr(getattr(fnn.layers, name), "examples", ())
    layers = [(build(name, ex), build(name, ex)) for ex in exs]
    for a, b in layers:
        assert a.kind == name and a is not b and a == b and hash(a) == hash(b)
    distinct = {a for a, _ in layers}
    specs = {(ex.args, tuple(sorted(ex.kwargs.items()))) for ex in exs}
    assert len(distinct) == len(specs)
