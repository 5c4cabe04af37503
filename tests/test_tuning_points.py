"""The choice points in use: the convolution's kernel gradient per platform at lowering time
(a program exported for cuda/tpu from this CPU host carries the convolution form), compiler
options per function (``fnn.tuning.jit``; a plain ``jax.jit`` elsewhere keeps jaxlib's
defaults), and tuned formulations equal to the untuned ones and to float64. Fake timers only."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from fnn import backprop, losses, tuning
from fnn.combinators import serial, stack
from fnn.layers import Conv, Dense, Flatten, Tanh
from fnn.layers import conv as C

X_SHAPE, W_SHAPE = (2, 5, 5, 3), (3, 3, 3, 4)


@pytest.fixture
def tune(tmp_path, monkeypatch):
    """``tune(seconds)``: a context with the tuner on, a fake timer, a new cache directory and
    an empty in-process memo (nothing chosen before)."""
    from fnn.tuning import measure
    monkeypatch.setattr(measure, "_MEMO", {})

    def on(seconds):
        measure._MEMO.clear()
        on.calls += 1
        return tuning.settings(enabled=True, directory=tmp_path / str(on.calls),
                               timer=lambda name, run: seconds.get(name, 1.0))
    on.calls = 0
    return on


def _conv_args(dtype=np.float32):
    r = np.random.default_rng(0)
    return tuple(r.standard_normal(s).astype(dtype) for s in (X_SHAPE, W_SHAPE, (2, 5, 5, 4)))


def _kernel_grad_convs(text):
    """Convolutions in a StableHLO module, and those that compute the kernel gradient (their
    result has the kernel's shape: the "conv" form; "im2col" makes it a matmul)."""
    convs = re.findall(r"stablehlo\.convolution.*", text)
    kernel = "-> tensor<" + "x".join(map(str, W_SHAPE)) + "xf32>"
    return len(convs), sum(kernel in c for c in convs)


def test_kernel_grad_is_chosen_per_platform_at_lowering(monkeypatch):
    monkeypatch.setitem(C.KERNEL_GRAD, "cpu", "im2col")
    bwd = jax.jit(lambda x, w, dy: C.conv_backward(x, w, dy))
    args = _conv_args()
    cpu = bwd.lower(*args).as_text()
    assert _kernel_grad_convs(cpu) == (1, 0)                 # dx only: dw is the im2col matmul
    for platform in ("cuda", "tpu", "rocm"):                 # no such device here: lowering only
        text = export.export(bwd, platforms=[platform])(*args).mlir_module()
        assert _kernel_grad_convs(text) == (2, 1), platform  # dx and the convolution dw
    both = export.export(bwd, platforms=["cpu", "cuda"])(*args)
    assert _kernel_grad_convs(both.mlir_module())[1] >= 1    # cuda's branch beside cpu's
    monkeypatch.setitem(C.KERNEL_GRAD, "cpu", "conv")
    again = jax.jit(lambda x, w, dy: C.conv_backward(x, w, dy))     # a new trace reads the table
    assert _kernel_grad_convs(again.lower(*args).as_text()) == (2, 1)


def _ynn_convs(hlo):
    """Compiled-HLO lines where a convolution became a YNNPACK fusion."""
    return [l for l in hlo.splitlines() if "__ynn_fusion" in l and "conv_general_dilated" in l]


CNN_X = (2, 4, 4, 32)          # 32 channels: jaxlib's defaults send this convolution to YNNPACK


def _cnn_step():
    model = serial(Conv(32, (3, 3)), Tanh(), Flatten(), Dense(3))
    loss = losses.softmax_cross_entropy_with_integer_labels
    vg = backprop.value_and_grad(model, loss)

    def step(p, s, x, y):
        (l, _), g = vg(p, s, x, y)
        return l, g
    p, s, _ = model.init(jax.random.PRNGKey(0), CNN_X)
    x = np.random.default_rng(1).standard_normal(CNN_X)
    return step, p, s, x, np.array([0, 2])


def test_compiler_options_per_function_and_results_unchanged(tune):
    step, p, s, x, y = _cnn_step()
    p32, x32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (p, x))
    ref = jax.jit(step)(p, s, x, y)                          # float64, untuned
    untuned = jax.jit(step)(p32, s, x32, y)
    fast = {"im2col": 3.0, "conv": 3.0, "im2col, conv off YNNPACK": 2.0,
            "conv, conv off YNNPACK": 1.0,                    # the fake timer's winner
            "default": 2.0, "conv off YNNPACK": 1.0}          # the whole step confirms it
    with tune({**fast, "conv off YNNPACK": 2.5}):             # the whole step does not
        assert tuning.jit(step).options_for(p32, s, x32, y) == "default"
        entry = [e for e in tuning.measure.memo_entries() if e["key"]["point"] == "jit.options"]
        assert len(entry) == 1 and entry[0]["key"]["key"]["options"] == "conv off YNNPACK"
    with tune(fast):
        tuned = tuning.jit(step)
        out = tuned(p32, s, x32, y)
        assert tuned.options_for(p32, s, x32, y) == "conv off YNNPACK"
        tuned_hlo = tuned.lower(p32, s, x32, y).compile().as_text()
        conv = jax.jit(lambda a, b: C.conv(a, b)).lower(x32, p32["0"]["w"]).compile().as_text()
        lowered = tuned.lower(p32, s, x32, y).as_text()
    assert not _ynn_convs(tuned_hlo) and "convolution(" in tuned_hlo   # XLA's own convolutions
    assert _ynn_convs(conv)                        # a plain jax.jit meanwhile: jaxlib's defaults
    assert sum("-> tensor<32x3x3x32xf32>" in c    # the "conv" kernel gradient under those options
               and "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]" in c      # laid out for XLA:CPU
               for c in re.findall(r"stablehlo\.convolution.*", lowered)) == 1
    for a, b, r in zip(jax.tree.leaves(out), jax.tree.leaves(untuned), jax.tree.leaves(ref)):
        assert tuning.agree(np.asarray(b), np.asarray(a)) is None
        np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-5)


def test_stack_forms_agree_with_stored_and_float64(tune):
    layer = serial(Dense(6), Tanh())
    x = np.random.default_rng(2).standard_normal((3, 6))
    ref_model = stack(layer, 3, remat=False)
    p, s, _ = ref_model.init(jax.random.PRNGKey(0), x.shape)

    def run(model, p, x):
        y, _, res = model.fwd(p, s, x)
        return y, model.bwd(p, s, res, jnp.ones_like(y))
    ref = jax.jit(lambda p, x: run(ref_model, p, x))(p, x)                   # float64
    p32, x32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (p, x))
    base = jax.jit(lambda p, x: run(ref_model, p, x))(p32, x32)
    kept = []                  # each jitted lambda stays alive: no id reused by the next one
    for form in ("remat", "unrolled"):
        auto = stack(layer, 3)                                # remat="auto"
        with tune({"stored": 3.0, "remat": 2.0 if form == "remat" else 4.0, "unrolled": 2.5}):
            kept.append(lambda p, x: run(auto, p, x))
            jitted = jax.jit(kept[-1])
            out = jitted(p32, x32)
            text = jitted.lower(p32, x32).as_text()
        assert ("while" in text) == (form != "unrolled"), form
        for a, b, r in zip(jax.tree.leaves(out), jax.tree.leaves(base), jax.tree.leaves(ref)):
            assert tuning.agree(np.asarray(b), np.asarray(a)) is None, form
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat must be True, False or 'auto'"):
        stack(layer, 3, remat="sometimes")


def test_kernel_gradient_forms_are_timed_in_a_loop_body():
    """The tuner times each kernel-gradient form as the body of a loop whose input changes each
    step (fit's epochs run it so, and XLA:CPU runs the "conv" form there far slower than at
    the top level): the timed function holds a while loop over the whole forward and backward
    and returns what one call gives."""
    from fnn.layers._conv_tuning import in_a_loop
    x, w, dy = _conv_args(np.float64)
    once = lambda x, w, dy: (C.conv(x, w), C.conv_backward(x, w, dy, kernel_grad="conv"))
    run = in_a_loop(once)
    eqns = jax.make_jaxpr(run)(x, w, dy).eqns
    loops = [e for e in eqns if e.primitive.name in ("while", "scan")]   # fori_loop: a scan
    assert len(loops) == 1 and "conv_general_dilated" in str(loops[0].params)
    assert not any(e.primitive.name == "conv_general_dilated" for e in eqns)   # none hoisted
    for a, b in zip(jax.tree.leaves(jax.jit(run)(x, w, dy)), jax.tree.leaves(once(x, w, dy))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_jax_gradients_of_convolutions_get_options_timed_whole(tune):
    """A function with convolutions and no choice point (``jax.grad`` of a conv) is timed
    whole under the convolution's option set; one without convolutions is not timed."""
    def grad(w, x):
        return jax.grad(lambda w: jnp.sum(jnp.tanh(C.conv(x, w))))(w)
    x, w, _ = _conv_args()
    with tune({"default": 2.0, "conv off YNNPACK": 1.0}):
        tuned = tuning.jit(grad)
        assert tuned.options_for(w, x) == "conv off YNNPACK"
        np.testing.assert_allclose(tuned(w, x), jax.jit(grad)(w, x), rtol=1e-4, atol=1e-5)
    with tune({"default": 1.0, "conv off YNNPACK": 2.0}):
        assert tuning.jit(grad).options_for(w, x) == "default"
    with tune({"default": 2.0, "conv off YNNPACK": 1.0}):
        dense = tuning.jit(lambda w, x: jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w))
        assert dense.options_for(w[0, 0], x[:, 0, 0]) == "default"
        assert not [e for e in tuning.measure.memo_entries()
                    if e["key"]["point"] == "jit.options"]
