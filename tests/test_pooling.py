"""Pooling: forward and backward against float64 NumPy loops written from the definitions
(ties, overlapping windows, padding counted or not), backward against ``jax.vjp``, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers import AvgPool, GlobalAvgPool, GlobalMaxPool, MaxPool
from fnn.layers import pooling as P

from helpers import no_autodiff, rel_err

# --------------------------------------------------------------------------- NumPy references

def np_pads(padding, sizes, window, strides):
    if padding == "VALID":
        return [(0, 0)] * len(sizes)
    if padding == "SAME":                    # output ceil(n/s), odd cell at the high end
        tot = [max((math.ceil(n / s) - 1) * s + k - n, 0)
               for n, k, s in zip(sizes, window, strides)]
        return [(t // 2, t - t // 2) for t in tot]
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def windows(x_shape, window, strides, padding):
    """Yield (output index, list of input indices in row-major window order, pad cell count)."""
    strides = window if strides is None else ((strides,) * len(window)
                                              if isinstance(strides, int) else strides)
    sizes = x_shape[1:-1]
    pads = np_pads(padding, sizes, window, strides)
    out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(sizes, pads, window, strides)]
    for o in np.ndindex(*out):
        cells, padded = [], 0
        for k in np.ndindex(*window):
            i = tuple(o[a] * strides[a] + k[a] - pads[a][0] for a in range(len(window)))
            if all(0 <= i[a] < sizes[a] for a in range(len(window))):
                cells.append(i)
            else:
                padded += 1
        yield o, cells, padded, out


def np_max_pool(x, dy, window, strides=None, padding="VALID"):
    """Forward and backward: the error goes to the first maximum in row-major window order."""
    gen = list(windows(x.shape, window, strides, padding))
    out = gen[0][3]
    y, dx = np.zeros((x.shape[0], *out, x.shape[-1])), np.zeros_like(x)
    for b in range(x.shape[0]):
        for c in range(x.shape[-1]):
            for o, cells, _, _ in gen:
                vals = [x[(b, *i, c)] for i in cells]
                first = int(np.argmax(vals))              # numpy's argmax: first maximum
                y[(b, *o, c)] = vals[first]
                if dy is not None:
                    dx[(b, *cells[first], c)] += dy[(b, *o, c)]
    return y, dx


def np_avg_pool(x, dy, window, strides=None, padding="VALID", count_include_pad=True):
    gen = list(windows(x.shape, window, strides, padding))
    out = gen[0][3]
    y, dx = np.zeros((x.shape[0], *out, x.shape[-1])), np.zeros_like(x)
    for o, cells, padded, _ in gen:
        count = len(cells) + (padded if count_include_pad else 0)
        y[(slice(None), *o, slice(None))] = sum(x[(slice(None), *i, slice(None))]
                                                for i in cells) / count
        if dy is not None:
            for i in cells:
                dx[(slice(None), *i, slice(None))] += dy[(slice(None), *o, slice(None))] / count
    return y, dx


CASES = [  # (x shape, window, strides, padding)
    ((2, 5, 4, 3), (2, 2), None, "VALID"),
    ((2, 7, 6, 2), (3, 3), (2, 1), "SAME"),                # overlapping windows, odd sizes
    ((1, 6, 5, 2), (2, 3), 1, ((1, 0), (2, 1))),           # explicit, stride 1
    ((2, 9, 3), (3,), 2, "SAME"),                          # 1D
    ((1, 4, 5, 3, 2), (2, 3, 2), (2, 1, 1), "SAME"),       # 3D
]


def tie_input(rng, shape):
    """Small integers: many equal values inside windows, so tie handling matters."""
    return rng.integers(-2, 3, size=shape).astype(np.float64)


@pytest.mark.parametrize("xs,window,strides,padding", CASES)
def test_max_pool_forward_backward_match_numpy_with_ties(xs, window, strides, padding, rng,
                                                        monkeypatch):
    x = tie_input(rng, xs)
    out = P.pool_output_shape(xs, window, strides, padding)
    dy = rng.standard_normal(out)
    ref_y, ref_dx = np_max_pool(x, dy, window, strides, padding)
    y = P.max_pool(jnp.asarray(x), window, strides, padding)
    with no_autodiff(monkeypatch):
        dx = P.max_pool_backward(jnp.asarray(x), jnp.asarray(dy), window, strides, padding)
    assert y.shape == out == ref_y.shape
    np.testing.assert_array_equal(y, ref_y)
    assert rel_err(dx, ref_dx) < 1e-12


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("xs,window,strides,padding", CASES)
def test_avg_pool_forward_backward_match_numpy(xs, window, strides, padding, count_include_pad,
                                               rng, monkeypatch):
    x = rng.standard_normal(xs)
    out = P.pool_output_shape(xs, window, strides, padding)
    dy = rng.standard_normal(out)
    ref_y, ref_dx = np_avg_pool(x, dy, window, strides, padding, count_include_pad)
    y = P.avg_pool(jnp.asarray(x), window, strides, padding, count_include_pad)
    with no_autodiff(monkeypatch):
        dx = P.avg_pool_backward(jnp.asarray(x), jnp.asarray(dy), window, strides, padding,
                                 count_include_pad)
    assert y.shape == out == ref_y.shape
    assert rel_err(y, ref_y) < 1e-12 and rel_err(dx, ref_dx) < 1e-12


def test_count_include_pad_changes_the_border_only(rng):
    x = jnp.ones((1, 4, 4, 1))
    inc = P.avg_pool(x, (3, 3), 1, "SAME")
    exc = P.avg_pool(x, (3, 3), 1, "SAME", count_include_pad=False)
    np.testing.assert_allclose(exc, 1.0)                 # only real cells: mean of ones
    assert float(inc[0, 0, 0, 0]) == pytest.approx(4 / 9) and float(inc[0, 1, 1, 0]) == 1.0


@pytest.mark.parametrize("xs,window,strides,padding", CASES[1:3])
def test_backward_matches_vjp(xs, window, strides, padding, rng, monkeypatch):
    x = jnp.asarray(rng.standard_normal(xs))
    for fwd, bwd in ((P.max_pool, P.max_pool_backward), (P.avg_pool, P.avg_pool_backward)):
        y, vjp = jax.vjp(lambda x: fwd(x, window, strides, padding), x)
        dy = jnp.asarray(rng.standard_normal(y.shape))
        (ref,) = vjp(dy)
        with no_autodiff(monkeypatch):
            dx = bwd(x, dy, window, strides, padding)
        assert rel_err(dx, ref) < 1e-9


def test_global_pools_match_numpy(rng, monkeypatch):
    x = tie_input(rng, (2, 3, 4, 5))
    dy = rng.standard_normal((2, 5))
    flat = x.reshape(2, 12, 5)
    for layer, ref_y, ref_dx in [
        (GlobalAvgPool(), flat.mean(1), np.broadcast_to(dy[:, None, :] / 12, flat.shape)),
        (GlobalMaxPool(), flat.max(1),
         (np.arange(12)[None, :, None] == flat.argmax(1)[:, None, :]) * dy[:, None, :]),
    ]:
        params, state, out = layer.init(None, x.shape)
        y, _ = layer.apply(params, state, jnp.asarray(x))
        with no_autodiff(monkeypatch):
            dp, dx = layer.backward(params, state, jnp.asarray(x), jnp.asarray(dy))
        assert out == y.shape == (2, 5) and dp == {}
        assert rel_err(y, ref_y) < 1e-12
        assert rel_err(dx, ref_dx.reshape(x.shape)) < 1e-12


def test_layers_infer_shapes(key):
    for layer, shape, out in [(MaxPool((2, 2)), (3, 7, 6, 4), (3, 3, 3, 4)),
                              (AvgPool((3,), 2, "SAME"), (2, 9, 5), (2, 5, 5)),
                              (MaxPool((2, 2, 2), padding=1), (1, 3, 4, 5, 2), (1, 2, 3, 3, 2))]:
        assert layer.init(key, shape)[2] == out


def test_errors(key):
    with pytest.raises(ValueError, match=r"MaxPool: window must be a tuple with one entry per "
                                         r"spatial axis .* got 2"):
        MaxPool(2)
    with pytest.raises(ValueError, match=r"MaxPool: expected input of rank 4 \(batch, height, "
                                         r"width, channels\) for a window of 2 axes, got shape "
                                         r"\(3, 8\)"):
        MaxPool((2, 2)).init(key, (3, 8))
    with pytest.raises(ValueError, match=r"AvgPool: window 5 is larger than the padded input "
                                         r"\(3 \+ 0 \+ 0\) along spatial axis 1"):
        AvgPool((2, 5)).init(key, (1, 6, 3, 1))
    with pytest.raises(ValueError, match="AvgPool: strides must be a positive int or 2 positive"):
        AvgPool((2, 2), strides=0)
    with pytest.raises(ValueError, match=r"GlobalAvgPool: expected input of rank >= 3 "
                                         r"\(batch, \*spatial, channels\), got shape \(4, 5\)"):
        GlobalAvgPool().apply({}, {}, jnp.zeros((4, 5)))


def test_max_pool_ties_agree_with_jax_grad(rng):
    """The documented claim: XLA's select_and_scatter also gives the first maximum the error."""
    x = jnp.asarray(tie_input(rng, (1, 5, 5, 2)))
    dy = jnp.asarray(rng.standard_normal((1, 4, 4, 2)))
    (ref,) = jax.vjp(lambda x: P.max_pool(x, (2, 2), 1), x)[1](dy)
    assert rel_err(P.max_pool_backward(x, dy, (2, 2), 1), ref) < 1e-12
