"""The Layer protocol, the combinators built from it, and small tree helpers.

A layer is three pure functions (see ``DESIGN.md``)::

    params, state, out_shape = layer.init(key, input_shape)
    y, new_state             = layer.apply(params, state, x, *, key=None, train=False, **kw)
    dparams, dx              = layer.backward(params, state, x, dy, *, key=None, train=False, **kw)

``backward`` is the hand-derived vector-Jacobian product of ``apply`` with respect to
``(params, x)``, evaluated at the *incoming* ``state`` (the one ``apply`` received). ``dx`` is
``None`` where the input is not differentiable (integer token ids).

Residuals: a layer may also define the pair that ``jax.custom_vjp`` calls ``fwd``/``bwd``::

    y, new_state, res = layer.fwd(params, state, x, *, key=None, train=False, **kw)
    dparams, dx       = layer.bwd(params, state, res, dy, *, key=None, train=False, **kw)

``res`` (the residuals) is a pytree of arrays holding what the backward needs, so the hand path
runs each forward once. Every layer answers ``layer.vjp_fwd``/``layer.vjp_bwd``: its own pair, or
``apply`` with the input as the residual and ``backward`` — so a layer written with only
``init``/``apply``/``backward`` works everywhere. The combinators carry their children's
residuals.

Per-call inputs beyond ``x`` (``lengths=``, ``mask=``, ...) are keyword arguments. A layer names
the ones it takes in ``Layer.keywords``; combinators pass each child only the keywords it names
and take the union themselves, so ``serial(Embedding, LSTM, Dense)(..., lengths=l)`` reaches the
LSTM alone.

Randomness: a combinator gives child ``i`` the key ``jax.random.fold_in(key, i)``, in ``apply``
and ``backward`` alike, so a backward pass sees the same dropout masks as its forward pass.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Shape = tuple  # (batch, ...) of ints; a layer taking several inputs gets a tuple of shapes
PyTree = Any

__all__ = [
    "Layer", "Example", "examples", "serial", "parallel", "residual", "stack",
    "count_params", "summary", "default_dtype", "cast", "is_shape", "child_key", "split_key",
    "backward_from", "output_shape",
]


class Layer(NamedTuple):
    """A layer: ``init``, ``apply`` and hand-derived ``backward``, all pure functions.

    **Fields:**
      - ``init(key, input_shape) -> (params, state, output_shape)``
      - ``apply(params, state, x, *, key=None, train=False, **kw) -> (y, new_state)``
      - ``backward(params, state, x, dy, *, key=None, train=False, **kw) -> (dparams, dx)``
      - ``name``: shown in errors and ``summary``.
      - ``keywords``: names of the extra per-call keywords ``apply``/``backward`` take.
      - ``children``: ``((name, layer), ...)`` for combinators, for ``summary``.
      - ``stochastic``: ``True`` if ``apply(train=True)`` needs a ``key``.
      - ``fwd(params, state, x, *, key=None, train=False, **kw) -> (y, new_state, res)``
        (optional): ``apply`` that also returns the residuals ``res``, a pytree of arrays.
      - ``bwd(params, state, res, dy, *, key=None, train=False, **kw) -> (dparams, dx)``
        (optional, with ``fwd``): the hand-derived backward started from ``res``.
      - ``meta``: a read-only mapping of facts other code may ask of the layer:
        ``meta["twin"]`` (a recurrent layer's mirrored constructor, read by ``Bidirectional``),
        ``meta["input_range"]`` (``(lo, hi)`` when the input is integer ids that must lie in
        ``[lo, hi)``: ``Embedding``'s ``(0, vocab)``, read by :func:`fnn.checks.check_data`).

    ``fwd`` may use a faster formulation than ``apply`` as long as its ``y`` equals ``apply``'s
    to rounding; ``apply`` stays the plain form that autodiff differentiates.
    """

    init: Callable
    apply: Callable
    backward: Callable
    name: str = "layer"
    keywords: frozenset = frozenset()
    children: tuple = ()
    stochastic: bool = False
    fwd: Callable | None = None
    bwd: Callable | None = None
    meta: Mapping = MappingProxyType({})

    def __repr__(self):
        return f"<fnn.Layer {self.name}>"

    def __hash__(self):                  # ``meta`` is a read-only mapping: hash its items
        return hash(self[:-1] + (tuple(sorted(self.meta.items(), key=lambda kv: kv[0])),))

    def vjp_fwd(self, params, state, x, **kw):
        """``(y, new_state, res)``: ``fwd``, or ``apply`` keeping its input as the residual."""
        if self.fwd is not None:
            return self.fwd(params, state, x, **kw)
        y, new_state = self.apply(params, state, x, **kw)
        return y, new_state, x

    def vjp_bwd(self, params, state, res, dy, **kw):
        """``(dparams, dx)`` from residuals of :meth:`vjp_fwd`: ``bwd``, or ``backward``."""
        if self.bwd is not None:
            return self.bwd(params, state, res, dy, **kw)
        return self.backward(params, state, res, dy, **kw)


class Example(NamedTuple):
    """An example construction of a layer, for the shared test sweeps.

    ``args``/``kwargs`` go to the constructor, ``input_shape`` to ``init``. ``make_input(key,
    shape, dtype)`` builds an input (default: standard normal of ``dtype``); ``call_kwargs(key,
    shape)`` builds extra ``apply``/``backward`` keywords (``lengths=`` ...).
    """

    input_shape: Any
    args: tuple = ()
    kwargs: dict = {}
    make_input: Callable | None = None
    call_kwargs: Callable | None = None


def examples(*cases: Example):
    """Decorator attaching example constructions to a layer constructor.

    Every public constructor in ``fnn.layers`` must carry at least one; the test suite builds each
    example and checks ``backward`` against ``jax.vjp``, jit against eager, and shape inference.
    """
    def attach(constructor):
        constructor.examples = tuple(cases)
        return constructor
    return attach


# --------------------------------------------------------------------------- helpers

def default_dtype():
    """The default float dtype: float64 when ``jax_enable_x64`` is on, else float32."""
    return jnp.zeros(()).dtype


def cast(tree: PyTree, dtype) -> PyTree:
    """Cast every floating-point leaf of ``tree`` to ``dtype`` (integer leaves are kept)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def is_shape(s) -> bool:
    """True for a single shape: a tuple of ints (not a tuple of shapes)."""
    return isinstance(s, tuple) and all(isinstance(d, (int, np.integer)) for d in s)


def child_key(key, i: int):
    """The key a combinator hands its ``i``-th child, ``fold_in(key, i)`` (``None`` stays
    ``None``)."""
    return None if key is None else jax.random.fold_in(key, i)


split_key = child_key  # the former name (it folds; it never split)


def backward_from(fwd: Callable, bwd: Callable) -> Callable:
    """``backward(params, state, x, dy, **kw)`` of a layer defined by its ``fwd``/``bwd`` pair:
    ``bwd`` of ``fwd``'s residuals."""
    def backward(params, state, x, dy, **kw):
        return bwd(params, state, fwd(params, state, x, **kw)[2], dy, **kw)
    return backward


# --------------------------------------------------------------------------- inspection

def output_shape(layer: Layer, input_shape):
    """The output shape ``layer.init`` infers for ``input_shape``, traced abstractly (no
    parameters are drawn, no FLOPs)."""
    out = []

    def init(key):
        params, state, shape = layer.init(key, input_shape)
        out.append(shape)
        return params, state
    jax.eval_shape(init, jax.eval_shape(jax.random.PRNGKey, 0))
    return out[0]


def count_params(params: PyTree) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(math.prod(np.shape(a)) for a in jax.tree.leaves(params)))


class Summary(str):
    """The table :func:`summary` returns: a ``str`` whose ``repr`` is the table itself, so a
    notebook or REPL shows it once, laid out, as the value of ``fnn.summary(...)``."""

    def __repr__(self):
        return str(self)

    def _repr_pretty_(self, p, cycle):                  # IPython
        p.text(str(self))


def summary(model: Layer, input_shape, *, key=None, print_fn=None) -> Summary:
    """A table of each top-level child: name, output shape, parameters; returned, not printed.

    For a ``serial`` the rows follow the children in order; any other layer is one row.
    Returns a :class:`Summary` (a ``str`` whose ``repr`` is the table), so in a notebook the
    last-line ``fnn.summary(model, shape)`` shows the table once, like Flax's ``tabulate``; in a
    script write ``print(fnn.summary(model, shape))``. ``print_fn`` (e.g. ``print`` or
    ``logging.info``) is also called with the text when given, Keras-style.

    >>> from fnn.layers import Dense, Relu, serial
    >>> print(summary(serial(Dense(8), Relu(), Dense(2)), (32, 4)))
    #  layer     output shape  params
    ---------------------------------
    0  Dense(8)  (32, 8)           40
    1  Relu      (32, 8)            0
    2  Dense(2)  (32, 2)           18
    ---------------------------------
    input (32, 4)   total params 58
    """
    key = jax.random.PRNGKey(0) if key is None else key
    rows = []
    if model.name == "serial" and model.children:
        shape = input_shape
        for i, (n, l) in enumerate(model.children):
            p, _, shape = l.init(child_key(key, i), shape)
            rows.append((n, l.name, shape, count_params(p)))
    else:
        p, _, shape = model.init(key, input_shape)
        rows.append(("", model.name, shape, count_params(p)))
    total = sum(r[3] for r in rows)
    head = ("#", "layer", "output shape", "params")
    cells = [head] + [(n, name, str(tuple(s)) if is_shape(s) else str(s), f"{c:,}")
                      for n, name, s, c in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(4)]
    fmt = lambda r: "  ".join(c.rjust(w) if j == 3 else c.ljust(w)
                              for j, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(fmt(head))
    text = "\n".join([fmt(head), rule] + [fmt(r) for r in cells[1:]] + [rule,
                     f"input {tuple(input_shape)}   total params {total:,}"])
    if print_fn is not None:
        print_fn(text)
    return Summary(text)


from fnn.combinators import parallel, residual, serial, stack  # noqa: E402  (re-exported)
