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
    "backward_from",
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


def _kw_for(layer: Layer, kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k in layer.keywords}


def _check_kw(name: str, accepted: frozenset, kw: dict):
    unknown = set(kw) - set(accepted)
    if unknown:
        raise TypeError(f"{name}: unexpected keyword(s) {sorted(unknown)}; "
                        f"this model takes {sorted(accepted) or 'none'}")


def _named(items) -> list[tuple[str, Layer]]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Layer):
            out.append((str(i), item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], Layer):
            out.append(item)
        else:
            raise TypeError(f"expected a Layer or a (name, Layer) pair at position {i}, "
                            f"got {type(item).__name__}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"child names must be unique, got {names}")
    return out


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return jax.tree.map(jnp.add, a, b)


# --------------------------------------------------------------------------- serial

def serial(*layers) -> Layer:
    """Compose layers in sequence: ``y = f_n(... f_2(f_1(x)))``.

    Children are ``Layer``s or ``(name, Layer)`` pairs; params and state are dicts keyed by the
    names (``"0"``, ``"1"``, ... by default). ``fwd`` runs the children's ``vjp_fwd`` and keeps
    their residuals (``{name: res}``); ``bwd`` runs their ``vjp_bwd`` in reverse, each child's
    output error becoming the previous child's — backpropagation.

    >>> model = serial(Dense(64), Relu(), Dense(10))
    """
    named = _named(layers)
    keywords = frozenset().union(*(l.keywords for _, l in named)) if named else frozenset()

    def init(key, input_shape):
        params, state, shape = {}, {}, input_shape
        for i, (n, l) in enumerate(named):
            try:
                params[n], state[n], shape = l.init(child_key(key, i), shape)
            except ValueError as e:
                raise ValueError(f"serial[{n}] ({l.name}): {e}") from None
        return params, state, shape

    def run(method, params, state, x, key, train, kw):
        """Thread ``x`` through each child's ``method`` (``"apply"`` or ``"vjp_fwd"``); returns
        the output and, per child name, the rest of what the method returned."""
        _check_kw("serial", keywords, kw)
        rest = {}
        for i, (n, l) in enumerate(named):
            try:
                x, *rest[n] = getattr(l, method)(params[n], state[n], x, key=child_key(key, i),
                                                 train=train, **_kw_for(l, kw))
            except ValueError as e:
                raise ValueError(f"serial[{n}] ({l.name}): {e}") from None
        return x, rest

    def apply(params, state, x, *, key=None, train=False, **kw):
        y, rest = run("apply", params, state, x, key, train, kw)
        return y, {n: r[0] for n, r in rest.items()}

    def fwd(params, state, x, *, key=None, train=False, **kw):
        y, rest = run("vjp_fwd", params, state, x, key, train, kw)
        return y, {n: r[0] for n, r in rest.items()}, {n: r[1] for n, r in rest.items()}

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw("serial", keywords, kw)
        grads = {}
        for i in reversed(range(len(named))):           # errors flow back through the children
            n, l = named[i]
            grads[n], dy = l.vjp_bwd(params[n], state[n], res[n], dy, key=child_key(key, i),
                                     train=train, **_kw_for(l, kw))
        return grads, dy

    return Layer(init, apply, backward_from(fwd, bwd), "serial", keywords, tuple(named),
                 any(l.stochastic for _, l in named), fwd, bwd)


# --------------------------------------------------------------------------- parallel

def parallel(*layers, concat: bool | int = False) -> Layer:
    """Apply every layer to the same input; outputs as a tuple, or concatenated.

    ``concat=True`` joins the outputs along the last axis (``concat=k``: along axis ``k``);
    their other dimensions must agree. ``bwd`` splits the output error between the children and
    sums their input gradients.
    """
    named = _named(layers)
    keywords = frozenset().union(*(l.keywords for _, l in named)) if named else frozenset()
    axis = None if concat is False else (-1 if concat is True else int(concat))

    def init(key, input_shape):
        params, state, shapes = {}, {}, []
        for i, (n, l) in enumerate(named):
            try:
                params[n], state[n], s = l.init(child_key(key, i), input_shape)
            except ValueError as e:
                raise ValueError(f"parallel[{n}] ({l.name}): {e}") from None
            shapes.append(s)
        if axis is None:
            return params, state, tuple(shapes)
        rest = {tuple(d for j, d in enumerate(s) if j != axis % len(s)) for s in shapes}
        if len(rest) != 1 or len({len(s) for s in shapes}) != 1:
            raise ValueError(f"parallel: cannot concatenate outputs of shapes {shapes} "
                             f"along axis {axis}")
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        return params, state, tuple(out)

    def merge(ys):
        return tuple(ys) if axis is None else jnp.concatenate(ys, axis=axis)

    def apply(params, state, x, *, key=None, train=False, **kw):
        _check_kw("parallel", keywords, kw)
        ys, new_state = [], {}
        for i, (n, l) in enumerate(named):
            y, new_state[n] = l.apply(params[n], state[n], x, key=child_key(key, i),
                                      train=train, **_kw_for(l, kw))
            ys.append(y)
        return merge(ys), new_state

    def fwd(params, state, x, *, key=None, train=False, **kw):
        _check_kw("parallel", keywords, kw)
        ys, new_state, res = [], {}, {}
        for i, (n, l) in enumerate(named):
            y, new_state[n], res[n] = l.vjp_fwd(params[n], state[n], x, key=child_key(key, i),
                                                train=train, **_kw_for(l, kw))
            ys.append(y)
        # zero-size markers carry each output's width along the concat axis to bwd as a static
        # shape (no bytes; residuals must be arrays, so they scan and stack like the rest)
        widths = () if axis is None else tuple(jnp.zeros((y.shape[axis], 0)) for y in ys)
        return merge(ys), new_state, {"children": res, "widths": widths}

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw("parallel", keywords, kw)
        if axis is None:
            dys = list(dy)
        else:
            cuts = np.cumsum([w.shape[-2] for w in res["widths"]])[:-1]
            dys = jnp.split(dy, cuts, axis=axis)
        grads, dx = {}, None
        for i, (n, l) in enumerate(named):
            grads[n], dxi = l.vjp_bwd(params[n], state[n], res["children"][n], dys[i],
                                      key=child_key(key, i), train=train, **_kw_for(l, kw))
            dx = _add(dx, dxi)
        return grads, dx

    return Layer(init, apply, backward_from(fwd, bwd), "parallel", keywords, tuple(named),
                 any(l.stochastic for _, l in named), fwd, bwd)


# --------------------------------------------------------------------------- residual

def residual(layer: Layer) -> Layer:
    """Skip connection: ``y = x + f(x)``; ``f`` must keep the input shape.

    Backward: ``dx = dy + f.backward(dy)`` — the identity path carries the error unchanged.
    The residuals are ``f``'s.
    """

    def init(key, input_shape):
        params, state, out = layer.init(key, input_shape)
        if tuple(out) != tuple(input_shape):
            raise ValueError(f"residual({layer.name}): the wrapped layer maps shape "
                             f"{tuple(input_shape)} to {tuple(out)}; a residual needs them equal")
        return params, state, out

    def apply(params, state, x, *, key=None, train=False, **kw):
        _check_kw(f"residual({layer.name})", layer.keywords, kw)
        y, new_state = layer.apply(params, state, x, key=key, train=train, **kw)
        return x + y, new_state

    def fwd(params, state, x, *, key=None, train=False, **kw):
        _check_kw(f"residual({layer.name})", layer.keywords, kw)
        y, new_state, res = layer.vjp_fwd(params, state, x, key=key, train=train, **kw)
        return x + y, new_state, res

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw(f"residual({layer.name})", layer.keywords, kw)
        grads, dx = layer.vjp_bwd(params, state, res, dy, key=key, train=train, **kw)
        return grads, dy + dx

    return Layer(init, apply, backward_from(fwd, bwd), f"residual({layer.name})",
                 layer.keywords, (("f", layer),), layer.stochastic, fwd, bwd)


# --------------------------------------------------------------------------- stack

def stack(layer: Layer, n: int, *, remat: bool = False) -> Layer:
    """``n`` copies of ``layer`` applied in sequence with one ``lax.scan``.

    Parameters (and state) of the copies are stacked along a new leading axis of size ``n``, so
    compile time does not grow with depth. ``layer`` must map its input shape to itself. Copy
    ``i`` gets the key ``fold_in(key, i)``.

    ``fwd`` scans the copies' ``vjp_fwd`` once, stacking each copy's residuals along the copy
    axis; ``bwd`` scans their ``vjp_bwd`` in reverse. ``remat=True`` trades compute for memory:
    ``fwd`` keeps only each copy's input (``n`` activations) and ``bwd`` reruns that copy's
    forward before its backward; ``apply`` wraps each copy in ``jax.checkpoint`` so that
    ``jax.grad`` of the stack rematerialises too.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"stack: n must be a positive int, got {n!r}")
    n = int(n)
    name = f"stack({layer.name}, {n})"

    def init(key, input_shape):
        ps, ss = [], []
        for i in range(n):
            p, s, out = layer.init(jax.random.fold_in(key, i), input_shape)
            if tuple(out) != tuple(input_shape):
                raise ValueError(f"stack({layer.name}): a stacked layer must keep its input shape, "
                                 f"but maps {tuple(input_shape)} to {tuple(out)}")
            ps.append(p)
            ss.append(s)
        stacked = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
        return stacked(ps), stacked(ss), tuple(input_shape)

    def keys(key):
        return None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))

    def scan(body, carry, xs, reverse=False):
        return jax.lax.scan(lambda c, a: body(c, *a), carry, xs, reverse=reverse, length=n)

    def apply(params, state, x, *, key=None, train=False, **kw):
        _check_kw(name, layer.keywords, kw)

        def run(p, s, h, k):            # keywords stay Python values (cache_len is static)
            return layer.apply(p, s, h, key=k, train=train, **kw)
        f = jax.checkpoint(run) if remat else run
        return scan(lambda h, p, s, k: f(p, s, h, k), x, (params, state, keys(key)))

    def fwd(params, state, x, *, key=None, train=False, **kw):
        _check_kw(name, layer.keywords, kw)

        def body(h, p, s, k):
            if remat:                   # keep the copy's input; bwd reruns its forward
                y, s2 = layer.apply(p, s, h, key=k, train=train, **kw)
                return y, (s2, h)
            y, s2, r = layer.vjp_fwd(p, s, h, key=k, train=train, **kw)
            return y, (s2, r)
        y, (new_state, res) = scan(body, x, (params, state, keys(key)))
        return y, new_state, res

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw(name, layer.keywords, kw)

        def body(d, p, s, k, r):
            if remat:
                r = layer.vjp_fwd(p, s, r, key=k, train=train, **kw)[2]
            dp, d = layer.vjp_bwd(p, s, r, d, key=k, train=train, **kw)
            return d, dp
        dx, grads = scan(body, dy, (params, state, keys(key), res), reverse=True)
        return grads, dx

    return Layer(init, apply, backward_from(fwd, bwd), name, layer.keywords,
                 ((f"0..{n - 1}", layer),), layer.stochastic, fwd, bwd)


# --------------------------------------------------------------------------- inspection

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

    >>> print(summary(serial(Dense(8), Relu(), Dense(2)), (32, 4)))
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
