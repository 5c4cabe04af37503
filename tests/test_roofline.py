"""fnn.accelerators on the host compiler: loops written out compute the same and leave no loop;
depth-extrapolated costs equal a fully unrolled build's; the roofline's arithmetic; the chip
table's errors; the bundled tasks' steps (hand against autodiff)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.accelerators import CHIPS, chip, deviceless, roofline as rl, task_steps, unrolled
from fnn.models import GPT, lm_loss, value_and_grad

from helpers import assert_trees_close


def jax_loops(compiled):
    """The compiled program's while loops but those XLA:CPU makes of a scatter-add under the
    suite's fast-compile flags (the embedding's gradient), which no unrolling can remove."""
    lines = compiled.as_text().splitlines()
    return [ln for ln in lines if rl._WHILE.search(ln) and "scatter" not in ln]


def tiny_gpt(depth, **kw):
    return GPT(40, 16, 4, depth, 32, 16, **kw)


def gpt_step(model):
    return task_steps.train_step(model, lm_loss, "hand")


def gpt_args(model):
    params, state, _ = model.init(jax.random.PRNGKey(0), (2, 16))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 40)
    return params, state, tokens, jnp.roll(tokens, 1, axis=1), jax.random.PRNGKey(2)


def test_unrolled_writes_out_scans_fori_loops_and_conds_and_computes_the_same():
    """Chunked causal attention with grouped heads and rotary positions in a 2-block stack: a
    scan over blocks, scans over query and key blocks, a lax.cond per block pair, a fori_loop
    with a bound computed from the key block's index. Unrolled: no while loop left, same loss
    and gradients, and XLA now counts more FLOPs (every iteration, not one)."""
    model = tiny_gpt(2, chunk_size=8, num_kv_heads=2, positions="rope")
    step, args = gpt_step(model), gpt_args(model)
    looped = deviceless.compile_for(step, *args)
    flat = deviceless.compile_for(unrolled(step), *args)
    assert len(jax_loops(looped)) >= 3 and jax_loops(flat) == []
    assert_trees_close(flat(*args), looped(*args), rtol=1e-12, atol=1e-12, what="unrolled step")
    assert flat.cost_analysis()["flops"] > 1.5 * looped.cost_analysis()["flops"]


def test_a_loop_longer_than_max_steps_stays_a_loop():
    def f(x):
        x = jax.lax.fori_loop(0, 5, lambda i, x: jnp.sin(x) + i, x)     # known bounds
        return jax.lax.scan(lambda c, a: (c * a, c), x, jnp.arange(1.0, 4.0))
    x = jnp.float64(0.3)
    want = f(x)
    for steps, loops in ((10, 0), (2, 2)):
        compiled = jax.jit(unrolled(f, max_steps=steps)).lower(x).compile()
        assert len(rl._WHILE.findall(compiled.as_text())) == loops
        assert_trees_close(compiled(x), want, rtol=1e-14, atol=0, what=f"max_steps={steps}")


def test_depth_extrapolation_equals_the_fully_unrolled_build():
    """``step_roofline`` of a 3-block GPT (compiled for the host): FLOPs and bytes from depth 1
    and 2 extrapolated equal those of the 3-block step written out by ``unrolled``, and the
    FLOPs those of ``fnn.models.value_and_grad(unroll=True)`` (a Python loop over the blocks,
    no unroll transform involved); the scan program, read as it is, counts fewer."""
    build = lambda d: (gpt_step(tiny_gpt(d)), gpt_args(tiny_gpt(d)))
    r = rl.step_roofline(build, "v5e", depth=3, target="cpu", dtype="float32")
    step, args = build(3)
    full = rl.cost(step, *args)
    python_loop = value_and_grad(tiny_gpt(3), unroll=True)
    reference = rl.cost(lambda p, s, x, t, k: python_loop(p, s, x, t, key=k), *args, unroll=False)
    as_is = rl.cost(step, *args, unroll=False)
    assert full.loops == reference.loops == r.loops < as_is.loops
    np.testing.assert_allclose(r.flops, full.flops, rtol=1e-3)
    np.testing.assert_allclose(r.bytes_accessed, full.bytes_accessed, rtol=0.05)
    np.testing.assert_allclose(r.flops, reference.flops, rtol=0.02)
    assert as_is.flops < 0.7 * r.flops
    assert r.temp_bytes == as_is.temp_bytes               # the real program's memory


def test_roofline_arithmetic():
    v5e = CHIPS["v5e"]
    c = rl.Cost(flops=6.07e12, bytes_accessed=70.9e9, temp_bytes=2 ** 30, loops=0, compile_s=1.0)
    r = rl.roofline_of(c, "v5e", model_flops=5.46e12)
    assert r.compute_s == pytest.approx(6.07e12 / 197e12) and r.bound == "memory"
    assert r.time_s == pytest.approx(70.9e9 / 819e9)                        # 86.6 ms
    assert r.mfu_bound == pytest.approx(5.46e12 / (r.time_s * v5e.peak("bfloat16")))
    assert round(r.mfu_bound, 2) == 0.32
    fast = rl.roofline_of(c._replace(bytes_accessed=1e9), "H100", dtype="float32")
    assert fast.bound == "compute" and fast.mfu_bound == pytest.approx(1.0)
    assert fast.time_s == pytest.approx(6.07e12 / 494e12)
    e = rl.extrapolate(c._replace(flops=10.0, loops=1), c._replace(flops=16.0), 8, depths=(2, 4))
    assert e.flops == pytest.approx(10 + 6 * 3) and e.loops == 1 and e.compile_s == 2.0
    with pytest.raises(ValueError, match="increase"):
        rl.extrapolate(c, c, 3, depths=(2, 2))
    params = {"w": jnp.zeros((3, 4)), "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
    assert rl.six_n_d(params, 10) == 6 * 16 * 10
    text = rl.table({"step A": r, "step B": fast})
    assert "| step A | v5e | bfloat16 |" in text and text.count("\n") == 4
    assert "memory-bound" in str(r) and "MFU <= 0.32" in str(r)


def test_chip_table_and_targets():
    assert set(CHIPS) == {"v4", "v5e", "v5p", "v6e", "A100", "H100"}
    assert chip("v5e").hbm_bandwidth == 819e9 and chip(CHIPS["v4"]) is CHIPS["v4"]
    with pytest.raises(ValueError, match="unknown chip 'v9'.*v5e"):
        chip("v9")
    with pytest.raises(ValueError, match="float64"):
        chip("v5e").peak("float64")
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(RuntimeError, match="H100 needs a CUDA GPU"):
            deviceless.sharding("H100")
    if not deviceless.tpu_compiler_available():
        with pytest.raises(RuntimeError, match="libtpu"):
            deviceless.sharding("v5e")


def test_task_steps_hand_equals_autodiff_and_names_are_checked():
    p = task_steps.problem("xor")
    params, state, _ = p.model.init(jax.random.PRNGKey(0), p.x.shape)
    x = jax.random.normal(jax.random.PRNGKey(1), p.x.shape)
    t = (x[:, :1] > 0).astype(x.dtype)
    hand, auto = (jax.jit(p.step(k))(params, state, x, t, None) for k in ("hand", "autodiff"))
    assert_trees_close(hand, auto, rtol=1e-10, atol=1e-12, what="xor hand vs autodiff")
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        task_steps.problem("mnist")
    with pytest.raises(ValueError, match="kind"):
        task_steps.train_step(p.model, p.loss, "numeric")


def test_fnn_doctor_roofline(capsys):
    from fnn.cli import main
    assert main(["doctor", "xor", "--roofline", "v5e"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fnn doctor xor --roofline v5e")
    assert out.count("v5e float32:") == 2 and "hand" in out and "autodiff" in out
    if not deviceless.tpu_compiler_available():
        assert "libtpu is not installed" in out
    assert main(["doctor", "xor", "--roofline", "v9"]) == 2
    assert main(["doctor", "mnist", "--roofline", "v5e"]) == 2
    assert "known: xor" in capsys.readouterr().err
