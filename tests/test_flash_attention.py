"""The Pallas flash-attention kernels (fnn/kernels) in Pallas' interpreter against float64 NumPy
attention and against jax.vjp of a plain jnp attention (forward, row statistics, dq, dk, dv:
causal, grouped-query, masks, lengths that are not whole blocks, float32 and bfloat16); their use
in MultiHeadAttention through the per-platform choice (a program exported for TPU/CUDA carries
the kernel, the CPU program is the jnp form, bit for bit); the deviceless TPU compile where
libtpu is installed. Compilations are the cost here: few configurations, each one jit."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from fnn.kernels import (flash_attention, flash_attention_bwd, flash_attention_fwd,
                         flash_attention_mode)
from fnn.layers import MultiHeadAttention

from helpers import no_autodiff
from test_attention import np_attention


def jnp_attention(q, k, v, mask, causal):
    """Plain attention in jnp (float64), written out: the reference jax.vjp differentiates."""
    (b, t, h, d), s, g = q.shape, k.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    ok = jnp.ones((b, h, t, s), bool)
    if mask is not None:
        ok = ok & jnp.broadcast_to(mask, ok.shape)
    if causal:
        ok = ok & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None]
    logits = jnp.where(ok, logits, -jnp.inf)
    m = jnp.max(jnp.where(ok, logits, -1e300), axis=-1, keepdims=True)
    e = jnp.where(ok, jnp.exp(logits - m), 0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-300)
    return jnp.einsum("bhts,bshd->bthd", p, v), m[..., 0], jnp.sum(e, axis=-1)


def data(seed, b, t, s, h, kh, d, dv, masked, dtype):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.normal(size=shape) for shape in
                   ((b, t, h, d), (b, s, kh, d), (b, s, kh, dv), (b, t, h, dv)))
    mask = None
    if masked:
        mask = rng.random((b, h, t, s)) > 0.3
        mask[0, 1, 2, :] = False                               # a row allowed no key
        mask = jnp.asarray(mask)
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(q), cast(k), cast(v), cast(do), mask


CASES = {   # b, t, s, h, kh, d, dv, masked, causal, dtype, blocks (q, k)
    "gqa-causal-mask-f32": (2, 13, 13, 4, 2, 8, 8, True, True, jnp.float32, (8, 8)),
    "mqa-cross-f32": (1, 9, 21, 3, 1, 8, 4, False, False, jnp.float32, (8, 16)),
    "gqa-causal-bf16": (2, 24, 24, 4, 2, 16, 16, False, True, jnp.bfloat16, (8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_attention_and_its_vjp(name, monkeypatch):
    b, t, s, h, kh, d, dv, masked, causal, dtype, (bq, bk) = CASES[name]
    q, k, v, do, mask = data(0, b, t, s, h, kh, d, dv, masked, dtype)
    kw = dict(causal=causal, block_q=bq, block_k=bk, interpret=True)

    def run(q, k, v, do, mask):
        out, (m, l) = flash_attention_fwd(q, k, v, mask, **kw)
        return out, m, l, flash_attention_bwd(q, k, v, out, (m, l), do, mask, **kw)

    with no_autodiff(monkeypatch):
        out, m, l, grads = jax.jit(run)(q, k, v, do, mask)
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    ref, vjp = jax.vjp(lambda q, k, v: jnp_attention(q, k, v, mask, causal)[0],
                       f64(q), f64(k), f64(v))
    _, m_ref, l_ref = jnp_attention(f64(q), f64(k), f64(v), mask, causal)
    np.testing.assert_allclose(ref, np_attention(q, k, v, mask, causal), atol=1e-12)
    tol = 2e-6 if dtype == jnp.float32 else 1e-2      # measured 3e-7, 4e-3 (bf16: P, dS rounded)
    err = lambda a, r: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(r))) /
                             np.max(np.abs(np.asarray(r))))
    assert out.dtype == dtype and err(out, ref) < tol
    live = np.asarray(l_ref) > 0                                   # rows that see a key
    np.testing.assert_allclose(np.where(live, m, 0), np.where(live, m_ref, 0),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(l, np.maximum(l_ref, 1), rtol=10 * tol)
    if masked:
        assert not live.all() and np.all(np.asarray(out, np.float64)[0, 2, 1] == 0)
    for got, want, what in zip(grads, vjp(f64(do)), "qkv"):
        assert got.dtype == dtype and got.shape == want.shape, what
        assert err(got, want) < 2 * tol, (what, err(got, want))


def test_custom_vjp_runs_the_hand_backward():
    """jax.grad through flash_attention gives the gradients of the plain form."""
    b, t, s, h, kh, d, dv, _, _, dtype, _ = CASES["mqa-cross-f32"]
    q, k, v, do, _ = data(1, b, t, s, h, kh, d, dv, False, dtype)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * do)
    got = jax.jit(jax.grad(loss(lambda q, k, v: flash_attention(
        q, k, v, block_q=8, block_k=16, interpret=True)), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: jnp_attention(q, k, v, None, False)[0]), (0, 1, 2))(
        *(jnp.asarray(a, jnp.float64) for a in (q, k, v)))
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_op():
    q, k, v, _, _ = data(0, 1, 4, 4, 2, 1, 8, 8, False, jnp.float32)
    with pytest.raises(TypeError, match="flash_attention: mask must be boolean"):
        flash_attention_fwd(q, k, v, jnp.ones((4, 4)), interpret=True)
    with pytest.raises(ValueError, match=r"flash_attention: mask of shape \(3, 4\)"):
        flash_attention_fwd(q, k, v, jnp.ones((3, 4), bool), interpret=True)
    with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
        flash_attention_fwd(q, jnp.ones((1, 4, 3, 8)), jnp.ones((1, 4, 3, 8)), interpret=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention_fwd(q, k, v, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="empty sequence"):
        flash_attention_fwd(q[:, :0], k, v, interpret=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        flash_attention_mode("sometimes")


# --------------------------------------------------------------------------- in the layer

LAYER = MultiHeadAttention(4, num_kv_heads=2, causal=True)


def layer_step(layer, x, dy, with_vjp=True):
    """The layer's hand forward + backward, and jax.vjp of its apply: one program."""
    params, state, _ = layer.init(jax.random.PRNGKey(1), x.shape)
    params = jax.tree.map(lambda a: a.astype(x.dtype), params)

    def step(params, x, dy):
        y, _, res = layer.fwd(params, state, x)
        hand = layer.bwd(params, state, res, dy)
        if not with_vjp:
            return y, hand
        y2, vjp = jax.vjp(lambda p, x: layer.apply(p, state, x)[0], params, x)
        return y, hand, y2, vjp(dy)
    return step, params


def custom_calls(step, args, platform):
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(
        *args).mlir_module()
    return re.findall(r"custom_call @([\w.$]+)", text)


def test_the_lowering_platform_chooses_the_kernel():
    """A program exported for TPU carries the Mosaic kernels (forward, dq, dkv; jax.vjp of apply
    runs the same three through the custom VJP), for CPU none; CUDA takes the Triton ones only
    when asked ("always": never yet compiled or run on a GPU)."""
    x = jnp.ones((2, 40, 16), jnp.float32)
    step, params = layer_step(LAYER, x, x)
    kernels = lambda p: [c for c in custom_calls(step, (params, x, x), p) if c != "Sharding"]
    assert kernels("tpu") == ["tpu_custom_call"] * 6
    assert kernels("cuda") == []
    assert kernels("cpu") == []
    with flash_attention_mode("always"):
        assert kernels("cuda") == ["__gpu$xla.gpu.triton"] * 6
    with flash_attention_mode("never"):
        assert kernels("tpu") == []


def test_cpu_program_unchanged_and_the_kernel_in_the_layer(monkeypatch):
    """On CPU "auto" computes exactly what "never" does (the jnp forms, their residuals converted
    to the kernels' statistics and back: causal spans and chunks); "always" runs the layer through
    the interpreted kernel, which agrees (float32: 1e-5)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 70, 16)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 70, 16)), jnp.float32)
    chunked = MultiHeadAttention(4, num_kv_heads=2, causal=True, chunk_size=32)
    results = {}
    for mode in ("never", "auto", "always"):
        with flash_attention_mode(mode):
            for name, layer in (("plain", LAYER), ("chunked", chunked)):
                if mode == "always" and name == "chunked":
                    continue
                step, params = layer_step(layer, x, dy, with_vjp=name == "plain")
                results[mode, name] = jax.jit(step)(params, x, dy)
    for name in ("plain", "chunked"):
        jax.tree.map(np.testing.assert_array_equal, results["auto", name],
                     results["never", name])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 results["always", "plain"], results["never", "plain"])


def test_layer_falls_back_where_the_kernel_does_not_apply():
    """float64, dropout while training and decoding keep the jnp forms (no Pallas call traced)."""
    x = jnp.ones((1, 8, 16), jnp.float32)
    params, _, _ = LAYER.init(jax.random.PRNGKey(0), x.shape)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    drop = MultiHeadAttention(4, num_kv_heads=2, causal=True, dropout=0.5)
    kernel = lambda f, *a: "pallas_call" in str(jax.make_jaxpr(f)(*a))
    assert kernel(lambda p, x: LAYER.apply(p, {}, x)[0], params, x)
    assert not kernel(lambda p, x: LAYER.apply(p, {}, x)[0],
                      jax.tree.map(lambda a: a.astype(jnp.float64), params), x.astype(jnp.float64))
    assert not kernel(lambda p, x: drop.apply(p, {}, x, key=jax.random.PRNGKey(0), train=True)[0],
                      params, x)
    assert kernel(lambda p, x: drop.apply(p, {}, x)[0], params, x)          # not training
    assert not kernel(lambda p, x: LAYER.apply(p, {}, x, cache_len=8)[0], params, x)


# --------------------------------------------------------------------------- TPU, deviceless

def tpu_mesh():
    pytest.importorskip("libtpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc("v5e:1x1", "tpu", chips_per_host_bounds=(1, 1, 1))
    except Exception as e:                                   # noqa: BLE001 - libtpu's errors
        pytest.skip(f"no deviceless TPU topology here: {e}")
    return topologies.make_mesh(topo, (1,), ("d",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_compile_for_tpu_v5e(dtype):
    """Forward and backward compile for a TPU v5e with no TPU attached (causal, GQA, a per-head
    mask, lengths that are not whole blocks, head_dim 48); the cost analysis sees the kernels'
    declared cost (pl.CostEstimate), not their insides."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    rep = NamedSharding(tpu_mesh(), P())
    b, t, h, kh, d = 2, 200, 4, 2, 48
    shapes = [(b, t, h, d), (b, t, kh, d), (b, t, kh, d), (b, t, h, d)]
    args = [jax.ShapeDtypeStruct(s, dtype, sharding=rep) for s in shapes]
    args.append(jax.ShapeDtypeStruct((b, h, t, t), jnp.bool_, sharding=rep))

    def run(q, k, v, do, mask):
        out, stats = flash_attention_fwd(q, k, v, mask, causal=True)
        return out, flash_attention_bwd(q, k, v, out, stats, do, mask, causal=True)
    compiled = jax.jit(run).lower(*args).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
    flops = compiled.cost_analysis()["flops"]
    pairs = b * h * t * (t + 1) // 2                     # the causal triangle
    assert 18 * d * pairs <= flops <= 1.05 * 18 * d * pairs      # 2 + 3 + 4 matmuls, 2·d each
