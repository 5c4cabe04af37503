"""The Layer protocol and small tree helpers (``docs/design.md`` explains the design).

A layer is four pure functions and a few facts about itself::

    params, state, out_shape = layer.init(key, input_shape)
    y, new_state             = layer.apply(params, state, x, *, key=None, train=False, **kw)
    y, new_state, res        = layer.fwd(params, state, x, *, key=None, train=False, **kw)
    dparams, dx              = layer.bwd(params, state, res, dy, *, key=None, train=False, **kw)

``fwd``/``bwd`` (the names ``jax.custom_vjp`` uses) are the forward that also returns its
residuals ``res`` (a pytree of arrays: what the backward needs) and the **hand-derived**
vector-Jacobian product of ``apply`` with respect to ``(params, x)`` started from them, evaluated
at the *incoming* ``state``. ``dx`` is ``None`` where the input is not differentiable (integer
token ids). ``layer.backward(params, state, x, dy)`` is derived from the pair.

A layer is written in one of two ways: with its residual pair (``Layer(init, apply, fwd, bwd,
...)``), or in the lesson's three-function form, ``from_backward(init, apply, backward, ...)``,
whose residual is the input itself.

What a layer *is* is its ``kind`` (its constructor's name), never its display ``name``. A
constructor decorated with :func:`constructor` gives its layers **structural identity**: two
layers built by the same constructor from equal arguments compare and hash equal, so compiled
functions are reused by that key.

Per-call inputs beyond ``x`` (``lengths=``, ``mask=``, ...) are keyword arguments. A layer names
the ones it takes in ``Layer.keywords``; combinators pass each child only the keywords it names
and take the union themselves, so ``serial(Embedding, LSTM, Dense)(..., lengths=l)`` reaches the
LSTM alone.

Randomness: a combinator gives child ``i`` the key ``jax.random.fold_in(key, i)``, in ``apply``
and ``bwd`` alike, so a backward pass sees the same dropout masks as its forward pass.
"""
from __future__ import annotations

import functools
import inspect
import math
from types import MappingProxyType
from typing import Any, Callable, Hashable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn._identity import Same

Shape = tuple  # (batch, ...) of ints; a layer taking several inputs gets a tuple of shapes
PyTree = Any

__all__ = [
    "Layer", "from_backward", "constructor", "Example", "examples", "count_params", "summary",
    "default_dtype", "cast", "is_shape", "child_key", "output_shape",
]

_EMPTY = MappingProxyType({})


class _Fields(NamedTuple):
    init: Callable
    apply: Callable
    fwd: Callable
    bwd: Callable
    name: str = "layer"
    kind: str = "layer"
    keywords: frozenset = frozenset()
    children: tuple = ()
    stochastic: bool = False
    meta: Mapping = _EMPTY
    spec: Hashable | None = None


class Layer(_Fields):
    """A layer: ``init``, ``apply`` and the residual pair ``fwd``/``bwd``, all pure functions.

    **Fields:**
      - ``init(key, input_shape) -> (params, state, output_shape)``
      - ``apply(params, state, x, *, key=None, train=False, **kw) -> (y, new_state)``
      - ``fwd(params, state, x, *, key=None, train=False, **kw) -> (y, new_state, res)``:
        ``apply`` that also returns the residuals ``res``, a pytree of arrays. ``fwd`` may use a
        faster formulation than ``apply`` as long as its ``y`` equals ``apply``'s to rounding;
        ``apply`` stays the plain form that autodiff differentiates.
      - ``bwd(params, state, res, dy, *, key=None, train=False, **kw) -> (dparams, dx)``: the
        hand-derived backward started from ``res``.
      - ``name``: for people (errors, ``summary``); code never parses it.
      - ``kind``: what the layer is, its constructor's name (``"Dense"``, ``"serial"``, ...);
        code that must know (weight loaders, ``summary``, ``debug``) dispatches on it.
      - ``keywords``: names of the extra per-call keywords ``apply``/``fwd``/``bwd`` take.
      - ``children``: ``((name, layer), ...)`` for combinators.
      - ``stochastic``: ``True`` if ``apply(train=True)`` needs a ``key``.
      - ``meta``: a read-only mapping of facts other code may ask of the layer:
        ``meta["twin"]`` (a recurrent layer's mirrored constructor, read by ``Bidirectional``),
        ``meta["input_range"]`` (``(lo, hi)`` when the input is integer ids that must lie in
        ``[lo, hi)``: ``Embedding``'s ``(0, vocab)``, read by :func:`fnn.checks.check_data`).
      - ``spec``: the structural identity :func:`constructor` records (``None``: identity of the
        functions).
    """

    __slots__ = ()

    def __new__(cls, init, apply, fwd, bwd, name="layer", kind="layer", keywords=frozenset(),
                children=(), stochastic=False, meta=_EMPTY, spec=None):
        if not all(callable(f) for f in (init, apply, fwd, bwd)):
            raise TypeError(
                "Layer(init, apply, fwd, bwd, ...): all four must be functions; got "
                f"{', '.join(type(f).__name__ for f in (init, apply, fwd, bwd))}. A layer "
                "written as init/apply/backward (the form before fnn 0.2) is "
                "fnn.core.from_backward(init, apply, backward, name=...)")
        return super().__new__(cls, init, apply, fwd, bwd, name, kind, frozenset(keywords),
                               tuple(children), bool(stochastic), MappingProxyType(dict(meta)),
                               spec)

    def __repr__(self):
        return f"<fnn.Layer {self.name}>"

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, Layer):
            return NotImplemented
        if self.spec is None or other.spec is None:
            return tuple.__eq__(self[:-2], other[:-2]) and dict(self.meta) == dict(other.meta) \
                and self.spec is other.spec
        return (self.kind, self.spec) == (other.kind, other.spec)

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        if self.spec is not None:
            return hash((self.kind, self.spec))
        return hash(self[:-2] + (tuple(sorted(self.meta.items(), key=lambda kv: kv[0])),))

    def _replace(self, **changes):
        """A copy with ``changes``; a changed function, child or keyword drops the structural
        identity (``spec``) unless a new one is given."""
        if "spec" not in changes and set(changes) - {"name"}:
            changes["spec"] = None
        if "meta" in changes:
            changes["meta"] = MappingProxyType(dict(changes["meta"]))
        return super()._replace(**changes)

    def backward(self, params, state, x, dy, **kw):
        """``(dparams, dx)`` at input ``x``: ``bwd`` of ``fwd``'s residuals."""
        return self.bwd(params, state, self.fwd(params, state, x, **kw)[2], dy, **kw)


def from_backward(init: Callable, apply: Callable, backward: Callable, *, name: str = "layer",
                  kind: str = "layer", keywords=frozenset(), children=(), stochastic=False,
                  meta: Mapping = _EMPTY) -> Layer:
    """A layer from the lesson's three functions: ``init``, ``apply`` and the hand-derived
    ``backward(params, state, x, dy, **kw) -> (dparams, dx)``. Its residual is its input:
    ``fwd`` is ``apply`` keeping ``x``, ``bwd`` is ``backward``.

    >>> import jax.numpy as jnp
    >>> double = from_backward(lambda key, shape: ({}, {}, shape),
    ...                        lambda p, s, x, **kw: (2 * x, s),
    ...                        lambda p, s, x, dy, **kw: ({}, 2 * dy), name="double")
    >>> double.backward({}, {}, jnp.ones(3), jnp.ones(3))[1].tolist()
    [2.0, 2.0, 2.0]
    """
    def fwd(params, state, x, **kw):
        y, new_state = apply(params, state, x, **kw)
        return y, new_state, x

    return Layer(init, apply, fwd, backward, name, kind, keywords, children, stochastic, meta)


def _freeze(v):
    """A hashable stand-in for a constructor argument: equal exactly when the arguments are
    (values with their type, containers by content, layers structurally, anything else that
    hashes by its own ``==``; arrays and other unhashable objects by identity)."""
    if isinstance(v, Layer):
        return v
    if isinstance(v, (list, tuple)):
        return (type(v), tuple(_freeze(a) for a in v))
    if isinstance(v, dict):
        return (dict, tuple(sorted(((k, _freeze(a)) for k, a in v.items()), key=repr)))
    if isinstance(v, (set, frozenset)):
        return (frozenset, frozenset(_freeze(a) for a in v))
    try:
        hash(v)
    except TypeError:
        return Same(v)
    return (type(v), v)


def constructor(fn: Callable) -> Callable:
    """Decorator for a function that builds a :class:`Layer`: the layer gets ``kind =
    fn.__name__`` and structural identity — ``spec`` is ``fn``'s bound arguments, defaults
    filled in, so ``Dense(8) == Dense(8, use_bias=True)`` and both hash alike.

    >>> from fnn.layers import Dense, Relu, serial
    >>> serial(Dense(8), Relu()) == serial(Dense(8), Relu()), Dense(8).kind
    (True, 'Dense')
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def build(*args, **kwargs):
        layer = fn(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        spec = (fn.__module__, fn.__qualname__,
                tuple((k, _freeze(v)) for k, v in bound.arguments.items()))
        try:
            hash(spec)
        except TypeError:                   # an argument whose own hash fails: identity
            spec = None
        return layer._replace(kind=fn.__name__, spec=spec)
    return build


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
    if model.kind == "serial" and model.children:
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

