"""Mixed-precision policies and the combinator that applies one to any layer.

A :class:`Policy` names three dtypes: ``params`` (the master weights, their gradients and the
optimizer state), ``compute`` (the arithmetic inside the model) and ``output`` (what the model
returns, and so what the loss sees). :func:`mixed_precision` applies one to any layer at its
boundary::

    model = mixed_precision(serial(Conv(16, (3, 3)), Relu(), ...), "bfloat16")
    params, state, _ = model.init(key, shape)          # float32 master weights
    y, state = model.apply(params, state, x)           # bfloat16 inside, float32 out

Inside, parameters and floating inputs are cast to ``compute``; integer inputs (token ids) stay
integers; the output is cast to ``output``; ``bwd`` casts the output error in and returns
parameter gradients in ``params``' dtype and the input gradient in the input's dtype, so
``jax.grad`` and ``fnn.backprop`` give float32 gradients of float32 weights alike.

What stays in float32 whatever the compute dtype (see ``docs/design.md``): normalization
statistics (means, variances, running statistics — ``fnn.layers.norm`` computes them in at
least float32), the loss (the output dtype is float32 by default, so the loss and its gradient
are computed there), and any layer wrapped in :func:`full_precision`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnn.core import Layer, cast, constructor

__all__ = ["Policy", "policy", "mixed_precision", "full_precision"]

_SHORT = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "f16": "float16", "half": "float16", "float64": "float64",
          "f64": "float64"}


class Policy(NamedTuple):
    """Dtypes for ``params`` (master weights, gradients, optimizer state), ``compute`` and
    ``output``."""

    params: jnp.dtype
    compute: jnp.dtype
    output: jnp.dtype

    def __str__(self):
        return f"params={self.params.name},compute={self.compute.name},output={self.output.name}"


def _dtype(name, spec):
    """The float dtype ``name`` names (short names allowed), or a ``ValueError``."""
    key = str(name).strip().lower()
    try:
        d = jnp.dtype(_SHORT.get(key, key))
    except (TypeError, ValueError):
        raise ValueError(f"precision policy {spec!r}: unknown dtype {name!r}; expected one of "
                         f"float32, bfloat16, float16, float64") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"precision policy {spec!r}: dtypes must be floating point, got "
                         f"{d.name} (integer inputs such as token ids stay integers anyway)")
    return d


def policy(spec: str | Policy) -> Policy:
    """A :class:`Policy` from ``"params=float32,compute=bfloat16,output=float32"`` or a short
    name: ``"bfloat16"``/``"float16"`` compute in that dtype with float32 params and output;
    ``"float32"`` (and ``"float64"``) is that dtype throughout.

    >>> str(policy("bfloat16"))
    'params=float32,compute=bfloat16,output=float32'
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"precision policy: expected a str or Policy, got {type(spec).__name__}")
    if "=" not in spec:
        d = _dtype(spec, spec)
        base = d if d.itemsize >= 4 else jnp.dtype("float32")
        return Policy(base, d, base)
    fields = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        k = k.strip()
        if not sep or k not in Policy._fields or k in fields:
            raise ValueError(f"precision policy {spec!r}: expected comma-separated "
                             f"params=…, compute=…, output=… (each once), got {part.strip()!r}")
        fields[k] = _dtype(v, spec)
    return Policy(**{k: fields.get(k, jnp.dtype("float32")) for k in Policy._fields})


# --------------------------------------------------------------------------- the combinator

def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)


def _like(tree, dtypes):
    """Each floating leaf of ``tree`` cast to the dtype of the matching zero-size marker."""
    return jax.tree.map(lambda a, m: a if a is None else a.astype(m.dtype), tree, dtypes)


def _markers(tree):
    """Zero-byte arrays carrying each leaf's dtype through the residuals."""
    return jax.tree.map(lambda a: jnp.zeros((0,), jnp.asarray(a).dtype), tree)


@constructor
def mixed_precision(model: Layer, spec: str | Policy = "bfloat16") -> Layer:
    """``model`` computed in the policy's ``compute`` dtype with ``params``-dtype master weights.

    ``init`` returns params and state in ``params``' dtype; ``apply``/``fwd`` cast params and
    floating inputs to ``compute`` and the output to ``output``; the state passes uncast (batch
    norm keeps float32 running statistics, updated in float32); ``backward``/``bwd`` cast the output error to ``compute``, run the model's hand rules
    there, and return ``dparams`` in ``params``' dtype and ``dx`` in the input's dtype.
    Keyword arguments (``mask=``, ``lengths=``) pass through, floating ones cast to ``compute``.
    """
    p = policy(spec)

    def init(key, input_shape):
        params, state, out = model.init(key, input_shape)
        return cast(params, p.params), cast(state, p.params), out

    def inputs(params, x, kw):
        return cast(params, p.compute), cast(x, p.compute), cast(kw, p.compute)

    def apply(params, state, x, *, key=None, train=False, **kw):
        cp, cx, ckw = inputs(params, x, kw)
        y, new_state = model.apply(cp, state, cx, key=key, train=train, **ckw)
        return cast(y, p.output), new_state

    def fwd(params, state, x, *, key=None, train=False, **kw):
        cp, cx, ckw = inputs(params, x, kw)
        y, new_state, res = model.fwd(cp, state, cx, key=key, train=train, **ckw)
        return cast(y, p.output), new_state, (res, _markers(x))

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        inner, x_dtypes = res
        cp, _, ckw = inputs(params, (), kw)
        dp, dx = model.bwd(cp, state, inner, cast(dy, p.compute), key=key, train=train,
                               **ckw)
        return _like(dp, _markers(params)), (None if dx is None else _like(dx, x_dtypes))

    return Layer(init, apply, fwd, bwd, f"mixed_precision({model.name}, {p})",
                 keywords=model.keywords, children=(("model", model),),
                 stochastic=model.stochastic, meta={"policy": p})


@constructor
def full_precision(layer: Layer) -> Layer:
    """``layer`` computed in float32 (at least) inside a lower-precision model: its inputs and
    params are cast up, its output back to the input's dtype. Mark a numerically delicate layer
    (a final softmax, a custom normalizer) with it."""
    def up(a):
        return jnp.promote_types(a.dtype, jnp.float32)

    def apply(params, state, x, *, key=None, train=False, **kw):
        y, s, _ = fwd(params, state, x, key=key, train=train, **kw)
        return y, s

    def fwd(params, state, x, *, key=None, train=False, **kw):
        cast_up = lambda t: jax.tree.map(lambda a: a.astype(up(a)) if _is_float(a) else a, t)
        y, new_state, res = layer.fwd(cast_up(params), cast_up(state), cast_up(x), key=key,
                                          train=train, **kw)
        x_float = [a for a in jax.tree.leaves(x) if _is_float(a)]
        out = x_float[0].dtype if x_float else jnp.result_type(*jax.tree.leaves(params))
        return cast(y, out), new_state, (res, _markers(x))

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        inner, x_dtypes = res
        cast_up = lambda t: jax.tree.map(lambda a: a.astype(up(a)) if _is_float(a) else a, t)
        dp, dx = layer.bwd(cast_up(params), cast_up(state), inner, cast_up(dy), key=key,
                               train=train, **kw)
        return _like(dp, _markers(params)), (None if dx is None else _like(dx, x_dtypes))

    return layer._replace(apply=apply, fwd=fwd, bwd=bwd, name=f"full_precision({layer.name})",
                          children=(("layer", layer),))
