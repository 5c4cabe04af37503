"""Convolutions in the layout XLA:CPU's kernels take, written out by hand.

XLA:CPU runs a convolution fast only when its operands are laid out as its kernels take them:
input ``(batch, *spatial, features)``, kernel ``(*spatial, in, out)``, output like the input
(``NHWC``/``HWIO``, "canonical"). It moves any other layout there itself — but only in the
program's entry computation: inside a loop body (a ``fit`` epoch is one), a branch or a called
computation the convolution stays as written and runs as a generic loop nest, 20-60x slower
(a 3x3 kernel gradient 32 -> 64 on (32, 8, 8, 32): 1.2 ms at the top level, 65 ms per step in a
``fori_loop``; benchmarks/RESULTS.md, "in a loop body"). Kernel gradients are such convolutions
(the batch is the contracted axis): fnn's own ``"conv"`` form and every one JAX's autodiff
writes for a convolution.

:func:`conv_general_dilated` is ``lax.conv_general_dilated``'s primitive with its operands
transposed to the canonical layout first and the result transposed back: the same sums in the
same order, on CPU (other platforms get the convolution as written: their compilers choose
layouts themselves). :func:`canonical_convs` applies it to every convolution of a function
(``fit`` applies it to the gradient that ``jax.value_and_grad`` computes), so that the gradient
is still JAX's, only laid out for the CPU.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.extend import core as jex

__all__ = ["canonical_convs", "is_canonical", "has_convolution"]

_CONV = jex.primitives.conv_general_dilated_p


def _canonical_numbers(n: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, n + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, n + 1, *spatial),
                                    rhs_spec=(n + 1, n, *range(n)),
                                    out_spec=(0, n + 1, *spatial))


def is_canonical(dimension_numbers: lax.ConvDimensionNumbers) -> bool:
    """Whether a convolution's operands and result are already in XLA:CPU's layout."""
    return tuple(map(tuple, dimension_numbers)) == tuple(
        map(tuple, _canonical_numbers(len(dimension_numbers.lhs_spec) - 2)))


def _transposed(lhs, rhs, params):
    """The convolution of ``params`` on operands moved to the canonical layout, moved back."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    n = len(lhs_spec) - 2
    out = _CONV.bind(lhs.transpose(lhs_spec[0], *lhs_spec[2:], lhs_spec[1]),
                     rhs.transpose(*rhs_spec[2:], rhs_spec[1], rhs_spec[0]),
                     **{**params, "dimension_numbers": _canonical_numbers(n)})
    back = [0] * (n + 2)        # the result's axis j is the canonical output's axis back[j]
    back[out_spec[0]], back[out_spec[1]] = 0, n + 1
    for i, axis in enumerate(out_spec[2:]):
        back[axis] = i + 1
    return out.transpose(back)


def conv_general_dilated(lhs, rhs, **params):
    """``lax.conv_general_dilated_p.bind(lhs, rhs, **params)`` (the primitive's parameters,
    ``dimension_numbers`` a ``lax.ConvDimensionNumbers``), computed on CPU in the canonical
    layout; as written elsewhere, and where it already is canonical."""
    if is_canonical(params["dimension_numbers"]):
        return _CONV.bind(lhs, rhs, **params)
    return lax.platform_dependent(lhs, rhs, cpu=functools.partial(_transposed, params=params),
                                  default=lambda a, b: _CONV.bind(a, b, **params))


def canonical_convs(fun):
    """``fun`` with each convolution of its program computed by :func:`conv_general_dilated`
    (the same values; see the module's docstring for why): ``fun`` is traced to a jaxpr, which
    is evaluated with every non-canonical convolution rewritten, in called jaxprs too (``jit``
    calls are inlined; the bodies of ``scan``, ``while_loop``, ``cond`` and ``jax.checkpoint``
    are rewritten in place). Custom-derivative functions need nothing: under
    ``jax.value_and_grad`` (what ``fit`` rewrites) their rules are traced in line. ``fun``
    takes and returns pytrees of arrays."""
    @functools.wraps(fun)
    def rewritten(*args):
        closed, shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        if not _needs_rewrite(closed.jaxpr):
            out = jex.jaxpr_as_fun(closed)(*jax.tree.leaves(args))
        else:
            out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shape), out)
    return rewritten


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for j in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(j, jex.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jex.Jaxpr):
                yield j


def has_convolution(jaxpr, which=lambda params: True) -> bool:
    """Whether ``jaxpr`` (or a jaxpr it calls) holds a convolution whose parameters satisfy
    ``which``."""
    return any((e.primitive is _CONV and which(e.params))
               or any(has_convolution(j, which) for j in _sub_jaxprs(e)) for e in jaxpr.eqns)


def _needs_rewrite(jaxpr) -> bool:
    return has_convolution(jaxpr, lambda params: not is_canonical(params["dimension_numbers"]))


_INLINED = {"pjit", "jit", "closed_call"}           # called jaxprs evaluated in place
_REWRITTEN = {"scan", "while", "cond"}              # bodies rewritten, the loop kept
_OPEN = {"remat2", "checkpoint"}                    # an open jaxpr rewritten, the remat kept


def _rewrite_closed(closed: jex.ClosedJaxpr) -> jex.ClosedJaxpr:
    """A closed jaxpr with the same signature, its convolutions rewritten."""
    if not _needs_rewrite(closed.jaxpr):
        return closed
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
             for a in closed.in_avals]
    return jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, a))(*avals)


def _rewrite_open(jaxpr: jex.Jaxpr) -> jex.Jaxpr:
    """An open jaxpr (a remat's body: no constants) with its convolutions rewritten; as it is
    where the rewrite would need constants."""
    closed = _rewrite_closed(jex.ClosedJaxpr(jaxpr, []))
    return closed.jaxpr if not closed.consts else jaxpr


def _eval(jaxpr, consts, args) -> list:
    env = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if eqn.primitive is _CONV:
            outvals = [conv_general_dilated(*invals, **eqn.params)]
        elif name in _INLINED and "jaxpr" in eqn.params and _needs_rewrite(
                eqn.params["jaxpr"].jaxpr):
            inner = eqn.params["jaxpr"]
            outvals = _eval(inner.jaxpr, inner.consts, invals)
        else:
            params = dict(eqn.params)
            if name in _OPEN and isinstance(params.get("jaxpr"), jex.Jaxpr) \
                    and not params["jaxpr"].constvars:
                params["jaxpr"] = _rewrite_open(params["jaxpr"])
            if name in _REWRITTEN:
                for k, v in params.items():
                    if isinstance(v, jex.ClosedJaxpr):
                        params[k] = _rewrite_closed(v)
                    elif isinstance(v, tuple) and v and all(isinstance(j, jex.ClosedJaxpr)
                                                            for j in v):
                        params[k] = tuple(_rewrite_closed(j) for j in v)
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals):
            if not isinstance(v, jex.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]
