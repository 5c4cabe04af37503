"""Mixed precision: one policy for every layer, for autodiff and for the hand path.

A :class:`Policy` names three dtypes: ``params`` (the master weights, their gradients and the
optimizer state), ``compute`` (the arithmetic inside the model) and ``output`` (what the model
returns, and so what the loss sees). :func:`mixed_precision` applies one to any layer at its
boundary::

    model = mixed_precision(serial(Conv(16, (3, 3)), Relu(), ...), "bfloat16")
    params, state, _ = model.init(key, shape)          # float32 master weights
    y, state = model.apply(params, state, x)           # bfloat16 inside, float32 out

Inside, parameters and floating inputs are cast to ``compute``; integer inputs (token ids) stay
integers; the output is cast to ``output``; ``backward``/``bwd`` cast the output error in and
return parameter gradients in ``params``' dtype and the input gradient in the input's dtype, so
``jax.grad`` and ``fnn.backprop`` give float32 gradients of float32 weights alike.

What stays in float32 whatever the compute dtype (see ``docs/design.md``): normalization
statistics (means, variances, running statistics — ``fnn.layers.norm`` computes them in at
least float32), the loss (the output dtype is float32 by default, so the loss and its gradient
are computed there), and any layer wrapped in :func:`full_precision`.

Loss scaling for float16 (whose gradients underflow below ~6e-8): :class:`LossScale` is a
pytree ``(scale, good_steps)`` with PyTorch GradScaler's dynamic rule. :func:`loss_scaling`
wraps an optimizer so that the scale lives in the optimizer state: its ``update`` unscales the
gradients, skips a non-finite step (zero update, inner state kept) and moves the scale; the
train step differentiates ``scale · loss`` (:func:`current_scale` reads it). ``fit(precision=
"float16")`` does all this inside the compiled epoch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnn.core import Layer, backward_from
from fnn.optim.base import GradientTransformation

__all__ = ["Policy", "policy", "mixed_precision", "full_precision", "LossScale",
           "loss_scale", "scale_loss", "unscale", "update_scale", "all_finite",
           "LossScalingState", "loss_scaling", "current_scale", "ScaledLoss"]

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


def _cast(tree, dtype):
    """Floating leaves to ``dtype``; integer leaves (token ids, lengths) unchanged."""
    return jax.tree.map(lambda a: a.astype(dtype) if _is_float(a) else a, tree)


def _like(tree, dtypes):
    """Each floating leaf of ``tree`` cast to the dtype of the matching zero-size marker."""
    return jax.tree.map(lambda a, m: a if a is None else a.astype(m.dtype), tree, dtypes)


def _markers(tree):
    """Zero-byte arrays carrying each leaf's dtype through the residuals."""
    return jax.tree.map(lambda a: jnp.zeros((0,), jnp.asarray(a).dtype), tree)


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
        return _cast(params, p.params), _cast(state, p.params), out

    def inputs(params, x, kw):
        return _cast(params, p.compute), _cast(x, p.compute), _cast(kw, p.compute)

    def apply(params, state, x, *, key=None, train=False, **kw):
        cp, cx, ckw = inputs(params, x, kw)
        y, new_state = model.apply(cp, state, cx, key=key, train=train, **ckw)
        return _cast(y, p.output), new_state

    def fwd(params, state, x, *, key=None, train=False, **kw):
        cp, cx, ckw = inputs(params, x, kw)
        y, new_state, res = model.vjp_fwd(cp, state, cx, key=key, train=train, **ckw)
        return _cast(y, p.output), new_state, (res, _markers(x))

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        inner, x_dtypes = res
        cp, _, ckw = inputs(params, (), kw)
        dp, dx = model.vjp_bwd(cp, state, inner, _cast(dy, p.compute), key=key, train=train,
                               **ckw)
        return _like(dp, _markers(params)), (None if dx is None else _like(dx, x_dtypes))

    return Layer(init, apply, backward_from(fwd, bwd), f"mixed_precision({model.name}, {p})",
                 model.keywords, (("model", model),), model.stochastic, fwd, bwd,
                 {"policy": p})


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
        y, new_state, res = layer.vjp_fwd(cast_up(params), cast_up(state), cast_up(x), key=key,
                                          train=train, **kw)
        x_float = [a for a in jax.tree.leaves(x) if _is_float(a)]
        out = x_float[0].dtype if x_float else jnp.result_type(*jax.tree.leaves(params))
        return _cast(y, out), new_state, (res, _markers(x))

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        inner, x_dtypes = res
        cast_up = lambda t: jax.tree.map(lambda a: a.astype(up(a)) if _is_float(a) else a, t)
        dp, dx = layer.vjp_bwd(cast_up(params), cast_up(state), inner, cast_up(dy), key=key,
                               train=train, **kw)
        return _like(dp, _markers(params)), (None if dx is None else _like(dx, x_dtypes))

    return layer._replace(apply=apply, backward=backward_from(fwd, bwd), fwd=fwd, bwd=bwd,
                          name=f"full_precision({layer.name})", children=(("layer", layer),))


# --------------------------------------------------------------------------- loss scaling

class LossScale(NamedTuple):
    """Loss-scaling state: ``scale`` (float32 scalar) and ``good_steps`` (int32: finite steps
    since the scale last changed). ``dynamic`` is static (part of the tree's structure)."""

    scale: jax.Array
    good_steps: jax.Array


def loss_scale(initial: float = 2.0 ** 15) -> LossScale:
    """A fresh loss scale (PyTorch GradScaler's default start, ``2^15``)."""
    if not initial > 0:
        raise ValueError(f"loss_scale: the initial scale must be positive, got {initial!r}")
    return LossScale(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32))


def scale_loss(value, ls: LossScale):
    """``value · scale``: what to differentiate so small gradients survive float16."""
    return value * ls.scale.astype(value.dtype)


def unscale(grads, ls: LossScale):
    """Gradients of the scaled loss divided by the scale, computed in float32 at least."""
    inv = 1.0 / ls.scale
    return jax.tree.map(lambda g: (g.astype(jnp.promote_types(g.dtype, jnp.float32)) * inv
                                   ).astype(g.dtype), grads)


def all_finite(tree) -> jax.Array:
    """True when every entry of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def update_scale(ls: LossScale, finite, *, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5) -> LossScale:
    """PyTorch GradScaler's rule: a non-finite step multiplies the scale by ``backoff_factor``
    (and the caller skips that step); ``growth_interval`` finite steps in a row multiply it by
    ``growth_factor``.
    """
    good = jnp.where(finite, ls.good_steps + 1, 0)
    grow = good >= growth_interval
    scale = jnp.where(finite, jnp.where(grow, ls.scale * growth_factor, ls.scale),
                      ls.scale * backoff_factor)
    return LossScale(scale.astype(jnp.float32), jnp.where(grow, 0, good).astype(jnp.int32))


# --------------------------------------------------------------------------- in an optimizer

class LossScalingState(NamedTuple):
    """The wrapped optimizer's state and the :class:`LossScale`."""

    inner: Any
    loss_scale: LossScale


def loss_scaling(optimizer, *, initial: float = 2.0 ** 15, dynamic: bool = True,
                 growth_interval: int = 2000) -> GradientTransformation:
    """``optimizer`` taking gradients of ``scale · loss``: ``update`` divides them by the scale
    (in float32), applies ``optimizer`` when all are finite and otherwise returns zero updates
    with the inner state unchanged (the step is skipped); a dynamic scale then follows
    :func:`update_scale`, a static one (``dynamic=False``) stays at ``initial``.
    """
    if growth_interval < 1:
        raise ValueError(f"loss_scaling: growth_interval must be >= 1, got {growth_interval}")

    def init(params):
        return LossScalingState(optimizer.init(params), loss_scale(initial))

    def update(grads, state, params=None):
        ls = state.loss_scale
        grads = unscale(grads, ls)
        ok = all_finite(grads)
        safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
        updates, inner = optimizer.update(safe, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        inner = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner, state.inner)
        ls = update_scale(ls, ok, growth_interval=growth_interval) if dynamic else ls
        return updates, LossScalingState(inner, ls)

    return GradientTransformation(init, update)


def current_scale(opt_state):
    """The :class:`LossScale` inside ``opt_state`` (found at trace time), or ``None``."""
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, LossScale))
             if isinstance(n, LossScale)]
    return found[0] if found else None


class ScaledLoss(NamedTuple):
    """``loss`` whose hand-derived ``grad`` is multiplied by ``scale`` (its value is not): the
    output error of a loss-scaled hand backward, scaled in float32 before the model casts it
    down."""

    loss: Any
    scale: jax.Array

    def __call__(self, pred, target, **kw):
        return self.loss(pred, target, **kw)

    def grad(self, pred, target, **kw):
        g = self.loss.grad(pred, target, **kw)
        return g * self.scale.astype(g.dtype)
