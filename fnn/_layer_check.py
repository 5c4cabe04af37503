"""Gradient checks of a model or a single layer, for :mod:`fnn.gradcheck` (which re-exports
:func:`check_model` and :func:`check_layer`): the hand-derived backward against ``jax.grad`` /
``jax.vjp`` and central finite differences, for the parameters **and** the input ``x``.

The input matters: a layer whose ``dx`` is wrong leaves every parameter gradient right when it
is the first layer of a model (nothing upstream consumes its ``dx``), so a check of parameter
gradients alone passes it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _float_input(x) -> bool:
    leaves = jax.tree.leaves(x)
    return bool(leaves) and all(jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                                for a in leaves)


def _check_params_and_x(who, f, hands, params, x, options):
    """:func:`check_grad` of ``f(params, x)`` in ``params`` (``x`` held) and, for a float ``x``,
    in ``x`` (``params`` held); ``hands`` maps a source name to ``(params, x) -> (dparams,
    dx)``. The input's rows are named ``x`` (``x[0]``, ... for a tuple input). One report;
    raises :class:`GradcheckError` on the worst failure unless ``raise_on_fail=False``."""
    from fnn.gradcheck import GradcheckReport, check_grad, raise_if_failed
    raise_on_fail = options.pop("raise_on_fail", True)
    jit = options.get("jit", True)
    wrap = (lambda g: jax.jit(g)) if jit else (lambda g: g)
    hand_fns = {name: wrap(h) for name, h in hands.items()}
    reports, rows = [], []
    if any(jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) for a in jax.tree.leaves(params)):
        reports.append(check_grad(lambda p: f(p, x), params, raise_on_fail=False, grad_fn={
            name: (lambda p, h=h: h(p, x)[0]) for name, h in hand_fns.items()}, **options))
        rows += reports[-1].rows
    if _float_input(x):
        reports.append(check_grad(lambda v: f(params, v), x, raise_on_fail=False, grad_fn={
            name: (lambda v, h=h: h(params, v)[1]) for name, h in hand_fns.items()}, **options))
        rows += [r._replace(leaf="x" + ("" if r.leaf == "<root>" else r.leaf))
                 for r in reports[-1].rows]
    if not reports:
        raise ValueError(f"{who}: neither the params nor the input x has floating-point "
                         f"leaves; nothing to check")
    r0 = reports[0]
    report = GradcheckReport(rows, value=r0.value, eps=r0.eps, rtol=r0.rtol,
                             atol=max(r.atol for r in reports), mode=r0.mode)
    if raise_on_fail:
        raise_if_failed(report, who)
    return report


def check_model(model, loss, params, state, x, target, *, key=None, train: bool = False,
                loss_kwargs: dict | None = None, **options):
    """:func:`~fnn.gradcheck.check_grad` of ``loss(model.apply(params, state, x), target)``
    with respect to ``params`` and, when ``x`` is a float array (or a tuple of them), to ``x``:
    checks ``fnn.backprop``'s hand-derived rules (``model.bwd`` of ``model.fwd``: its
    ``dparams`` and its ``dx``) and ``jax.grad`` against finite differences. The input's rows
    in the report are named ``x``: a first layer with a wrong ``dx`` fails there.

    ``options`` go to :func:`~fnn.gradcheck.check_grad` (``mode=``, ``rtol=``, ...).
    """
    lkw = dict(loss_kwargs or {})

    def f(p, x):
        return loss(model.apply(p, state, x, key=key, train=train)[0], target, **lkw)

    def hand(p, x):
        y, _, res = model.fwd(p, state, x, key=key, train=train)
        return model.bwd(p, state, res, loss.grad(y, target, **lkw), key=key, train=train)

    return _check_params_and_x("check_model", f, {"fnn.backprop": hand}, params, x, options)


def check_layer(layer, params, state, x, dy=None, *, key=None, train: bool = False,
                seed: int = 0, call_kwargs: dict | None = None, **options):
    """Check one layer's hand-derived backward, both paths: ``layer.backward`` and
    ``layer.bwd`` of ``layer.fwd``'s residuals, for ``dparams`` and (float input) ``dx``,
    against ``jax.vjp`` of ``apply`` and central finite differences.

    The scalar checked is ``⟨apply(params, state, x), dy⟩``, whose gradient is the VJP at
    ``dy`` (a fixed standard-normal draw from ``seed`` shaped like the output, unless given).
    Run in float64 (``jax_enable_x64``); cast the params and ``x`` with ``fnn.cast``.
    ``call_kwargs`` go to the layer (``lengths=``, ``mask=``); ``options`` to
    :func:`~fnn.gradcheck.check_grad`. **Returns** a :class:`~fnn.gradcheck.GradcheckReport`
    with rows per source (``backward``, ``bwd(fwd)``, ``jax.vjp``) and leaf (``x`` for the
    input); raises :class:`~fnn.gradcheck.GradcheckError` naming the worst failure.

    >>> from fnn.layers import Dense
    >>> layer = Dense(2)
    >>> params, state, _ = layer.init(jax.random.PRNGKey(0), (3, 4))
    >>> report = check_layer(layer, params, state, jnp.ones((3, 4)))
    >>> report.passed, sorted({r.source for r in report.rows})
    (True, ['backward', 'bwd(fwd)', 'jax.vjp'])
    """
    kw = dict(call_kwargs or {})
    call = dict(key=key, train=train, **kw)
    if dy is None:
        rng = np.random.default_rng(seed)
        out = jax.eval_shape(lambda: layer.apply(params, state, x, **call)[0])
        dy = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), out)

    def f(p, x):
        y = layer.apply(p, state, x, **call)[0]
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(dy)))

    def from_residuals(p, x):
        _, _, res = layer.fwd(p, state, x, **call)
        return layer.bwd(p, state, res, dy, **call)

    def autodiff(p, x):
        if _float_input(x):
            return jax.vjp(lambda p, x: layer.apply(p, state, x, **call)[0], p, x)[1](dy)
        return jax.vjp(lambda p: layer.apply(p, state, x, **call)[0], p)[1](dy)[0], None

    hands = {"backward": lambda p, x: layer.backward(p, state, x, dy, **call),
             "bwd(fwd)": from_residuals, "jax.vjp": autodiff}
    return _check_params_and_x("check_layer", f, hands, params, x,
                               {"autodiff": False, **options})
