"""Scaled dot-product attention (plain and chunked) against float64 NumPy references written from
the equations; hand-derived backward against jax.vjp with autodiff patched to raise; the residual
pair ``dot_product_attention_fwd``/``_bwd`` across jit calls; error messages. (The layer is in
tests/test_multi_head_attention.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers.attention import dot_product_attention as dpa
from fnn.layers.attention import dot_product_attention_backward as dpa_backward
from fnn.layers.attention import dot_product_attention_bwd as dpa_bwd
from fnn.layers.attention import dot_product_attention_fwd as dpa_fwd

from helpers import rel_err, vjp_and_hand


def np_attention(q, k, v, mask=None, causal=False, q_offset=0, bias=None):
    """softmax(q kᵀ/√d + bias over allowed keys) v, head by head, row by row; empty rows → 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    (b, t, h, d), s, g = q.shape, k.shape[1], q.shape[2] // k.shape[2]
    ok = np.ones((b, h, t, s), bool)
    if mask is not None:
        ok &= np.broadcast_to(np.asarray(mask), (b, h, t, s))
    if causal:
        ok &= np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None]
    extra = 0 if bias is None else np.broadcast_to(np.asarray(bias), (b, h, t, s))
    out = np.zeros((b, t, h, v.shape[3]))
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d) + \
                (0 if bias is None else extra[bi, hi])
            for ti in range(t):
                row = ok[bi, hi, ti]
                if row.any():
                    e = np.exp(logits[ti, row] - logits[ti, row].max())
                    out[bi, ti, hi] = (e / e.sum()) @ v[bi, row, hi // g]
    return out


def qkv(rng, b=2, t=7, s=9, h=4, kh=2, d=3, dv=5, dtype=np.float64):
    return (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype),
            jnp.asarray(rng.normal(size=(b, s, kh, d)), dtype),
            jnp.asarray(rng.normal(size=(b, s, kh, dv)), dtype))


def random_mask(rng, shape, empty_row=True):
    m = rng.random(shape) > 0.35
    if empty_row:
        m[0, 0, 1, :] = False                     # a query allowed no key at all
    return jnp.asarray(m)


CASES = {   # name: keyword arguments (mask shapes broadcast to (2, 4, 7, 9))
    "plain": {},
    "plain-causal-mask": {"causal": True, "mask": (2, 1, 7, 9)},
    "plain-bias-offset": {"causal": True, "q_offset": 2, "bias": (4, 7, 9)},
    "chunked-causal-mask": {"causal": True, "mask": (1, 4, 7, 9), "chunk_size": 3},
    "chunked-bias-mask": {"mask": (7, 9), "bias": (2, 1, 1, 9), "chunk_size": 4},
    "chunked-offset": {"causal": True, "q_offset": 3, "chunk_size": 2},
    "chunked-all": {"mask": (7, 9), "bias": (2, 1, 1, 9), "causal": True, "q_offset": 3,
                    "chunk_size": 4},
}


def build(rng, case):
    kw = dict(CASES[case])
    if "mask" in kw:
        kw["mask"] = random_mask(rng, kw["mask"], empty_row=len(kw["mask"]) == 4)
    if "bias" in kw:
        kw["bias"] = jnp.asarray(rng.normal(size=kw["bias"]))
    return kw


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_numpy(case, rng):
    q, k, v = qkv(rng)
    kw = build(rng, case)
    ref = np_attention(q, k, v, kw.get("mask"), kw.get("causal", False), kw.get("q_offset", 0),
                       kw.get("bias"))
    np.testing.assert_allclose(dpa(q, k, v, **kw), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["plain", "plain-causal-mask", "chunked-causal-mask",
                                  "chunked-all"])
def test_backward_matches_vjp(case, rng, monkeypatch):
    q, k, v = qkv(rng)
    kw = build(rng, case)
    if "causal-mask" in case:          # with dropout on P: the same masks in both passes
        kw.update(dropout_rate=0.3, dropout_key=jax.random.PRNGKey(5))
    dout = jnp.asarray(rng.normal(size=(2, 7, 4, 5)))
    ref, got = vjp_and_hand(lambda q, k, v: dpa(q, k, v, **kw), (q, k, v), dout,
                            lambda q, k, v, do: dpa_backward(q, k, v, do, **kw), monkeypatch)
    for a, b in zip(got, ref):
        assert np.isfinite(np.asarray(a)).all()
        assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("t,s,h,kh,q_offset", [(64, 64, 2, 1, 0), (96, 100, 2, 2, 5)])
def test_causal_blocks_match_numpy_and_vjp(t, s, h, kh, q_offset, rng, monkeypatch):
    """Long enough for the plain form's causal block skipping: each query block against its key
    prefix, with a mask (one empty row), a bias, grouped heads and an offset."""
    from fnn.layers.attention import _spans
    assert len(_spans(t, s, True, q_offset)) > 1
    q, k, v = qkv(rng, b=2, t=t, s=s, h=h, kh=kh, d=4, dv=3)
    kw = dict(causal=True, q_offset=q_offset, mask=random_mask(rng, (2, 1, t, s)),
              bias=jnp.asarray(rng.normal(size=(h, t, s))))
    ref = np_attention(q, k, v, kw["mask"], True, q_offset, kw["bias"])
    np.testing.assert_allclose(jax.jit(lambda q, k, v: dpa(q, k, v, **kw))(q, k, v), ref,
                               rtol=1e-12, atol=1e-12)
    kw.update(dropout_rate=0.2, dropout_key=jax.random.PRNGKey(3))
    dout = jnp.asarray(rng.normal(size=(2, t, h, 3)))
    ref, got = vjp_and_hand(lambda q, k, v: dpa(q, k, v, **kw), (q, k, v), dout,
                            lambda q, k, v, do: dpa_backward(q, k, v, do, **kw), monkeypatch)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("chunk", [None, 3])
def test_vjp_returns_the_forward_output_and_the_backward(chunk, rng):
    from fnn.layers import dot_product_attention_vjp
    q, k, v = qkv(rng)
    kw = dict(causal=True, q_offset=1, chunk_size=chunk)
    dout = jnp.asarray(rng.normal(size=(2, 7, 4, 5)))
    out, grads = dot_product_attention_vjp(q, k, v, dout, **kw)
    np.testing.assert_allclose(out, np_attention(q, k, v, causal=True, q_offset=1),
                               rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, dpa_backward(q, k, v, dout, **kw)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["plain-causal-mask", "chunked-all"])
def test_residuals_are_arrays_and_cross_jit(case, rng, monkeypatch):
    """``dpa_fwd`` returns the forward's output and residuals that are arrays only (checked as
    ``dpa_fwd`` returns them, at trace time, where a Python number or NumPy array would show):
    computed in one jitted call, handed to ``dpa_bwd`` in another (dropout on), they give
    jax.vjp's gradients."""
    q, k, v = qkv(rng)
    kw = build(rng, case)
    kw.update(dropout_rate=0.3, dropout_key=jax.random.PRNGKey(2))
    not_arrays = []

    def fwd(q, k, v):
        out, res = dpa_fwd(q, k, v, **kw)
        not_arrays.extend(type(a).__name__ for a in jax.tree.leaves(res)
                          if not isinstance(a, jax.Array))
        return out, res
    out, res = jax.jit(fwd)(q, k, v)
    assert not not_arrays, f"residuals include {not_arrays}"
    np.testing.assert_array_equal(out, jax.jit(lambda q, k, v: dpa(q, k, v, **kw))(q, k, v))
    dout = jnp.asarray(rng.normal(size=out.shape))
    got = jax.jit(lambda r, d: dpa_bwd(r, d, **kw))(res, dout)
    ref = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: dpa(q, k, v, **kw), q, k, v)[1](dout))(
        q, k, v)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-9


def test_autodiff_of_the_forward_matches_finite_differences(rng):
    """jax.grad through dot_product_attention itself (not the hand rule) against central
    differences of the NumPy reference; causal, so query 0 has a lone allowed key, where a
    clamp written as max(rowsum, 1) would hand autodiff half the gradient."""
    q, k, v = qkv(rng)
    w = rng.normal(size=(2, 7, 4, 5))
    f = lambda q, k, v: jnp.sum(dpa(q, k, v, causal=True) * w)
    grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    for i, g in enumerate(grads):
        direction = rng.normal(size=g.shape)
        args = [np.asarray(a) for a in (q, k, v)]

        def at(eps):
            shifted = list(args)
            shifted[i] = args[i] + eps * direction
            return np.sum(np_attention(*shifted, causal=True) * w)
        fd = (at(1e-6) - at(-1e-6)) / 2e-6
        assert abs(np.sum(np.asarray(g) * direction) - fd) < 1e-7 * max(1, abs(fd))


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_chunked_equals_plain(dtype, tol, rng):
    q, k, v = qkv(rng, b=1, t=37, s=37, h=2, kh=1, d=16, dv=16, dtype=dtype)
    mask = random_mask(rng, (1, 1, 37, 37))
    kw = {"mask": mask, "causal": True}
    plain = jax.jit(lambda q, k, v: dpa(q, k, v, **kw))(q, k, v)
    chunked = jax.jit(lambda q, k, v: dpa(q, k, v, chunk_size=8, **kw))(q, k, v)
    assert chunked.dtype == dtype
    assert np.max(np.abs(np.asarray(chunked) - np.asarray(plain))) < tol


@pytest.mark.parametrize("chunk", [None, 2])
def test_fully_masked_rows_are_zero_not_nan(chunk):
    q, k, v = (jnp.ones((1, 3, 1, 2)),) * 3
    mask = jnp.array([True, False, True])[None, None, :, None] & jnp.ones((1, 1, 3, 3), bool)
    f = lambda q, k, v: dpa(q, k, v, mask, chunk_size=chunk)

    @jax.jit
    def run(q, k, v):
        out = f(q, k, v)
        grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), (0, 1, 2))(q, k, v)
        return out, grads, dpa_backward(q, k, v, 2 * out, mask, chunk_size=chunk)
    out, grads, hand = run(q, k, v)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_allclose(out[0, 0], 1.0)
    for g, h in zip(grads, hand):
        assert np.isfinite(np.asarray(g)).all() and np.isfinite(np.asarray(h)).all()
        np.testing.assert_allclose(h, g, atol=1e-12)


def test_chunked_memory_is_linear():
    """The compiled chunked forward+backward never holds a T×S matrix; the plain one does."""
    t = 2048
    x = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)

    def temp_bytes(chunk):
        f = lambda q, k, v: dpa_backward(q, k, v, q, causal=True, chunk_size=chunk)
        return jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    square = t * t * 4
    assert temp_bytes(None) >= square
    assert temp_bytes(128) < square / 8


def test_dropout_uses_the_key(rng):
    q, k, v = qkv(rng)
    drop = jax.jit(lambda key: dpa(q, k, v, dropout_rate=0.5, dropout_key=key))
    a, b, c = drop(jax.random.PRNGKey(0)), drop(jax.random.PRNGKey(0)), drop(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-3
    assert np.abs(np.asarray(a - dpa(q, k, v))).max() > 1e-3
    with pytest.raises(ValueError, match="needs a dropout_key"):
        dpa(q, k, v, dropout_rate=0.5)


def test_errors(rng):
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match="same head_dim"):
        dpa(q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 7, 9\) does not broadcast"):
        dpa(q, k, v, jnp.ones((2, 3, 7, 9), bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        dpa(q, k, v, jnp.ones((7, 8), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        dpa(q, k, v, jnp.ones((7, 9)))
    with pytest.raises(ValueError, match="multiple of the 3 key/value heads"):
        dpa(q, jnp.zeros((2, 9, 3, 3)), jnp.zeros((2, 9, 3, 5)))
    with pytest.raises(ValueError, match=r"expected q of shape \(batch, time, heads, head_dim\)"):
        dpa(q[0], k, v)
    with pytest.raises(ValueError, match="k, v the"):
        dpa(q, k, v[:, :4])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        dpa(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="dout shape"):
        dpa_backward(q, k, v, jnp.zeros((2, 7, 4, 3)))
