"""Every layer, combinator, GPT variant and bundled task model compiles for a TPU v5e chip.

Deviceless ahead-of-time compilation (``fnn.accelerators.deviceless``): libtpu's compiler, a
``v5e:1x1`` topology, arguments as ``ShapeDtypeStruct``\\ s. For each model the training step by
the hand-derived backward (``fwd`` then ``bwd``, or ``fnn.backprop.value_and_grad``) and by
``jax.vjp``/``jax.value_and_grad`` of ``apply``, in float32 and bfloat16 (layers: params,
inputs and state cast; models: ``mixed_precision(model, "bfloat16")``), train mode, x64 off as on
a TPU. A model that does not compile for TPU fails here rather than on a user's pod.

Skipped where libtpu is not installed (``pip install 'fnn[tpu]'``); run with
``JAX_PLATFORMS=cpu`` on a machine without a TPU. ``pytest --durations=0`` lists each compile.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fnn.accelerators import deviceless

if not deviceless.tpu_compiler_available():
    pytest.skip("libtpu is not installed (pip install 'fnn[tpu]'): no TPU compiler to test "
                "against", allow_module_level=True)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from fnn import layers  # noqa: E402
from fnn.accelerators import task_steps  # noqa: E402
from fnn.combinators import parallel, residual, serial, stack, tied  # noqa: E402
from fnn.models import GPT, lm_loss  # noqa: E402
from fnn.precision import mixed_precision  # noqa: E402

from test_layers_sweep import CASES, build  # noqa: E402

# JAX deprecates a scatter whose updates are wider than its operand (an error in a future
# release): a model that would stop compiling with the next JAX fails now
pytestmark = pytest.mark.filterwarnings("error:scatter inputs have incompatible types")
DTYPES = ["float32", "bfloat16"]
KEY = jax.random.PRNGKey(0)


def compile_v5e(fn, *args):
    """``fn`` compiled for one v5e chip, the arguments abstract; x64 off (TPU has no float64)."""
    with jax.enable_x64(False):
        return deviceless.compile_for(fn, *args, target="v5e")


def specs(fn, dtype, *args):
    """``jax.eval_shape(fn, *args)`` with x64 off, floating leaves as ``dtype``, on the v5e."""
    with jax.enable_x64(False):
        out = jax.eval_shape(fn, *args)
    return deviceless.abstract(out, "v5e", dtype)


def floats(x):
    return all(jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree.leaves(x))


def layer_step(layer, kind):
    """``(params, state, x, dy, key, kw) -> (y, grads)`` of one layer, train mode."""
    def hand(p, s, x, dy, key, kw):
        y, new_state, res = layer.fwd(p, s, x, key=key, train=True, **kw)
        return y, new_state, layer.bwd(p, s, res, dy, key=key, train=True, **kw)

    def autodiff(p, s, x, dy, key, kw):
        apply = lambda p, x: layer.apply(p, s, x, key=key, train=True, **kw)[0]
        y, vjp = jax.vjp(apply, p, x) if floats(x) else jax.vjp(lambda p: apply(p, x), p)
        return y, vjp(dy)
    return {"hand": hand, "autodiff": autodiff}[kind]


def compile_layer(layer, input_shape, dtype, make_input=None, call_kwargs=None):
    """Both steps of ``layer`` on ``input_shape`` compile for v5e in ``dtype``."""
    params, state, _ = specs(lambda k: layer.init(k, input_shape), dtype, KEY)
    make = (lambda k, s: make_input(k, s, jnp.float32)) if make_input else jax.random.normal
    several = isinstance(input_shape[0], tuple)
    x = specs(lambda k: tuple(make(jax.random.fold_in(k, j), s) for j, s in
                              enumerate(input_shape)) if several else make(k, input_shape),
              dtype, KEY)
    kw = specs(lambda k: call_kwargs(k, input_shape) if call_kwargs else {}, dtype, KEY)
    dy = specs(lambda p, s, x, kw: layer.apply(p, s, x, key=KEY, train=True, **kw)[0],
               dtype, params, state, x, kw)
    for kind in ("hand", "autodiff"):
        compile_v5e(layer_step(layer, kind), params, state, x, dy, KEY, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,i,ex", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_layer_steps_compile(name, i, ex, dtype):
    compile_layer(build(name, ex), ex.input_shape, dtype, ex.make_input, ex.call_kwargs)


COMBINATORS = {
    "serial": (serial(layers.Dense(8), layers.Relu(), layers.Dense(4)), (3, 5)),
    "parallel": (parallel(layers.Dense(4), layers.Dense(4), concat=True), (3, 5)),
    "residual": (residual(serial(layers.LayerNorm(), layers.Dense(5))), (3, 5)),
    "stack": (stack(serial(layers.Dense(5), layers.Tanh()), 3), (3, 5)),
    "stack-remat": (stack(serial(layers.Dense(5), layers.Dropout(0.1)), 3, remat=True), (3, 5)),
    "tied": (tied(serial(("embed", layers.Embedding(10, 4)),
                         ("head", layers.Dense(10, use_bias=False))),
                  "head/w", "embed/w", transpose=True), (3, 4)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(COMBINATORS))
def test_combinator_steps_compile(name, dtype):
    layer, shape = COMBINATORS[name]
    ids = (lambda k, s, dt: jax.random.randint(k, s, 0, 10)) if name == "tied" else None
    compile_layer(layer, shape, dtype, ids)


def compile_model(model, loss, x, target, dtype):
    """Hand and autodiff training steps of ``model`` (``mixed_precision`` for bfloat16)."""
    if dtype == "bfloat16":
        model = mixed_precision(model, "bfloat16")
    params, state, _ = specs(lambda k: model.init(k, x.shape), "float32", KEY)
    x, target = deviceless.abstract((x, target), "v5e")
    for kind in ("hand", "autodiff"):
        compile_v5e(task_steps.train_step(model, loss, kind), params, state, x, target, KEY)


GPTS = {
    "rope-gqa-remat": dict(positions="rope", num_kv_heads=2, remat=True),
    "rmsnorm-gated": dict(norm_type="rms", mlp="gated", use_bias=False),
    "chunked": dict(chunk_size=8),
    "dropout": dict(dropout=0.1, tie=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(GPTS))
def test_gpt_steps_compile(variant, dtype):
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    compile_model(GPT(64, 32, 4, 2, 64, 32, **GPTS[variant]), lm_loss, tokens, tokens, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", task_steps.NAMES)
def test_task_model_steps_compile(name, dtype):
    p = task_steps.problem(name)
    compile_model(p.model, p.loss, p.x, p.target, dtype)


def test_the_target_is_a_tpu_v5e():
    assert deviceless.sharding("v5e").mesh.devices.flat[0].device_kind == "TPU v5 lite"
    compiled = compile_v5e(lambda a: a @ a, jax.ShapeDtypeStruct((128, 128), jnp.bfloat16))
    assert compiled.cost_analysis()["flops"] == 2 * 128 ** 3


def test_importing_fnn_loads_no_libtpu():
    """libtpu is installed here; importing fnn (and fnn.accelerators) still leaves it alone."""
    code = ("import sys, fnn, fnn.accelerators, fnn.tasks; fnn.tasks.names(); "
            "print(sorted(m for m in sys.modules if 'libtpu' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_depth_extrapolation_on_the_tpu_compiler():
    """As tests/test_roofline.py on the host: a 3-block GPT's FLOPs and bytes extrapolated from
    depth 1 and 2 against the 3-block step written out, both compiled for v5e."""
    from fnn.accelerators import roofline as rl
    from test_roofline import gpt_args, gpt_step, tiny_gpt
    with jax.enable_x64(False):
        build = lambda d: (gpt_step(tiny_gpt(d)), gpt_args(tiny_gpt(d)))
        r = rl.step_roofline(build, "v5e", depth=3, dtype="float32")
        full = rl.cost(*(lambda s, a: (s, *a))(*build(3)), target="v5e")
    print(f"extrapolated {r.flops:.7g} FLOPs {r.bytes_accessed:.7g} B; written out "
          f"{full.flops:.7g} FLOPs {full.bytes_accessed:.7g} B")
    assert r.loops == full.loops == 0                  # (XLA:TPU fuses a little differently
    assert r.flops == pytest.approx(full.flops, rel=0.01)      # at each depth: 0.2% apart)
    assert r.bytes_accessed == pytest.approx(full.bytes_accessed, rel=0.05)
