"""The combinators: layers built from layers — ``serial``, ``parallel``, ``residual``,
``stack``, and ``tied`` (one parameter used in two places). Each runs its children's ``apply`` for the forward pass, carries their residuals
through ``fwd``, and runs their ``bwd`` in reverse in ``bwd`` — backpropagation itself.

Per-call keywords: a combinator takes the union of its children's ``Layer.keywords`` and hands
each child only the ones it names; keys: child ``i`` gets ``fold_in(key, i)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fnn.core import Layer, child_key, constructor
from fnn.tuning.stack import check_remat, stack_form

__all__ = ["serial", "parallel", "residual", "stack", "tied"]


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

@constructor
def serial(*layers) -> Layer:
    """Compose layers in sequence: ``y = f_n(... f_2(f_1(x)))``.

    Children are ``Layer``s or ``(name, Layer)`` pairs; params and state are dicts keyed by the
    names (``"0"``, ``"1"``, ... by default). ``fwd`` runs the children's ``fwd`` and keeps
    their residuals (``{name: res}``); ``bwd`` runs their ``bwd`` in reverse, each child's
    output error becoming the previous child's — backpropagation.

    >>> from fnn.layers import Dense, Relu
    >>> model = serial(Dense(8), Relu(), Dense(2))
    >>> params, state, out_shape = model.init(jax.random.PRNGKey(0), (32, 4))
    >>> out_shape, sorted(params), params["0"]["w"].shape
    ((32, 2), ['0', '1', '2'], (4, 8))
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
        """Thread ``x`` through each child's ``method`` (``"apply"`` or ``"fwd"``); returns
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
        y, rest = run("fwd", params, state, x, key, train, kw)
        return y, {n: r[0] for n, r in rest.items()}, {n: r[1] for n, r in rest.items()}

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw("serial", keywords, kw)
        grads = {}
        for i in reversed(range(len(named))):           # errors flow back through the children
            n, l = named[i]
            grads[n], dy = l.bwd(params[n], state[n], res[n], dy, key=child_key(key, i),
                                     train=train, **_kw_for(l, kw))
        return grads, dy

    return Layer(init, apply, fwd, bwd, "serial", "serial", keywords, named,
                 any(l.stochastic for _, l in named))


# --------------------------------------------------------------------------- parallel

@constructor
def parallel(*layers, concat: bool | int = False) -> Layer:
    """Apply every layer to the same input; outputs as a tuple, or concatenated.

    ``concat=True`` joins the outputs along the last axis (``concat=k``: along axis ``k``);
    their other dimensions must agree. To sum or multiply the outputs, follow with
    ``fnn.layers.Add()`` / ``Multiply()``: ``serial(parallel(f, g), Add())``. ``bwd`` splits the output error between the children and
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
            y, new_state[n], res[n] = l.fwd(params[n], state[n], x, key=child_key(key, i),
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
            grads[n], dxi = l.bwd(params[n], state[n], res["children"][n], dys[i],
                                      key=child_key(key, i), train=train, **_kw_for(l, kw))
            dx = _add(dx, dxi)
        return grads, dx

    return Layer(init, apply, fwd, bwd, "parallel", "parallel", keywords, named,
                 any(l.stochastic for _, l in named))


# --------------------------------------------------------------------------- residual

@constructor
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
        y, new_state, res = layer.fwd(params, state, x, key=key, train=train, **kw)
        return x + y, new_state, res

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw(f"residual({layer.name})", layer.keywords, kw)
        grads, dx = layer.bwd(params, state, res, dy, key=key, train=train, **kw)
        return grads, dy + dx

    return Layer(init, apply, fwd, bwd, f"residual({layer.name})", "residual", layer.keywords,
                 (("f", layer),), layer.stochastic)


# --------------------------------------------------------------------------- stack

@constructor
def stack(layer: Layer, n: int, *, remat: bool | str = "auto") -> Layer:
    """``n`` copies of ``layer`` applied in sequence with one ``lax.scan``.

    Parameters (and state) of the copies are stacked along a new leading axis of size ``n``, so
    compile time does not grow with depth. ``layer`` must map its input shape to itself. Copy
    ``i`` gets the key ``fold_in(key, i)``.

    ``fwd`` scans the copies' ``fwd`` once, stacking each copy's residuals along the copy axis;
    ``bwd`` scans their ``bwd`` in reverse. ``remat=True`` trades compute for memory: ``fwd``
    keeps only each copy's input and ``bwd`` reruns that copy's forward before its backward;
    ``apply`` wraps each copy in ``jax.checkpoint`` so ``jax.grad`` rematerialises too.
    ``remat="auto"``: ``fwd``/``bwd`` store, remat or unroll, whichever was measured fastest for
    the shapes (:mod:`fnn.tuning.stack`; stored with the tuner off).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"stack: n must be a positive int, got {n!r}")
    check_remat(remat)
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

    def scan(body, carry, xs, reverse=False, how="stored"):
        return jax.lax.scan(lambda c, a: body(c, *a), carry, xs, n, reverse, n if how == "unrolled" else 1)

    def apply(params, state, x, *, key=None, train=False, **kw):
        _check_kw(name, layer.keywords, kw)

        def run(p, s, h, k):            # keywords stay Python values (cache_len is static)
            return layer.apply(p, s, h, key=k, train=train, **kw)
        f = jax.checkpoint(run) if remat is True else run
        return scan(lambda h, p, s, k: f(p, s, h, k), x, (params, state, keys(key)))

    def fwd(params, state, x, *, key=None, train=False, **kw):
        _check_kw(name, layer.keywords, kw)
        how = stack_form(model, layer, n, remat, params, x, train, kw)   # stored/remat/unrolled

        def body(h, p, s, k):
            if how == "remat":          # keep the copy's input; bwd reruns its forward
                y, s2 = layer.apply(p, s, h, key=k, train=train, **kw)
                return y, (s2, h)
            y, s2, r = layer.fwd(p, s, h, key=k, train=train, **kw)
            return y, (s2, r)
        y, (new_state, res) = scan(body, x, (params, state, keys(key)), how=how)
        return y, new_state, res

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        _check_kw(name, layer.keywords, kw)
        how = stack_form(model, layer, n, remat, params, dy, train, kw)

        def body(d, p, s, k, r):
            if how == "remat":
                r = layer.fwd(p, s, r, key=k, train=train, **kw)[2]
            dp, d = layer.bwd(p, s, r, d, key=k, train=train, **kw)
            return d, dp
        dx, grads = scan(body, dy, (params, state, keys(key), res), reverse=True, how=how)
        return grads, dx

    return (model := Layer(init, apply, fwd, bwd, name, "stack", layer.keywords,
                           ((f"0..{n - 1}", layer),), layer.stochastic, {"n": n, "remat": remat}))


# --------------------------------------------------------------------------- tied

def _path(p, what):
    keys = tuple(p.split("/")) if isinstance(p, str) else tuple(p)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"tied: {what} must be a path of param keys such as 'head/w' or "
                         f"('head', 'w'), got {p!r}")
    return keys


def _get(tree, keys, where):
    for i, k in enumerate(keys):
        if not isinstance(tree, dict) or k not in tree:
            have = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ValueError(f"{where}: no parameter {'/'.join(keys)} (at {'/'.join(keys[:i]) or 'the top'}"
                             f" the keys are {have})")
        tree = tree[k]
    return tree


def _put(tree, keys, value):
    """A copy of ``tree`` with ``value`` at ``keys`` (dicts made on the way)."""
    if not keys:
        return value
    out = dict(tree)
    out[keys[0]] = _put(tree.get(keys[0], {}), keys[1:], value)
    return out


def _pop(tree, keys):
    """``(tree without keys, the value there)``; dicts left empty are dropped."""
    out = dict(tree)
    if len(keys) == 1:
        return out, out.pop(keys[0])
    out[keys[0]], value = _pop(tree[keys[0]], keys[1:])
    if not out[keys[0]]:
        del out[keys[0]]
    return out, value


@constructor
def tied(layer: Layer, target, source, *, transpose: bool = False) -> Layer:
    """Weight tying: ``layer``'s parameter at ``target`` *is* its parameter at ``source``
    (transposed when ``transpose``), e.g. the output head ``h Eᵀ`` sharing the embedding ``E``::

        lm = tied(serial(("embed", Embedding(V, d)), ..., ("head", Dense(V, use_bias=False))),
                  "head/w", "embed/w", transpose=True)

    Paths are param keys joined by ``/`` (or a tuple of keys). ``init`` drops ``target`` from the
    params (and any dict left empty), so only ``source`` is stored, trained and saved; ``apply``,
    ``fwd`` and ``bwd`` run ``layer`` with ``source`` (or ``sourceᵀ``) put back at ``target``.
    Backward: the gradient of the one parameter is the sum of both uses',
    ``d source = (d source)_layer + (d target)_layer`` (transposed back). Nest ``tied`` for
    several ties. ``init`` checks both paths exist and their shapes agree.

    >>> from fnn.layers import Dense, Embedding
    >>> lm = tied(serial(("embed", Embedding(10, 4)), ("head", Dense(10, use_bias=False))),
    ...           "head/w", "embed/w", transpose=True)
    >>> params, _, out = lm.init(jax.random.PRNGKey(0), (2, 3))
    >>> sorted(params), out
    (['embed'], (2, 3, 10))
    """
    tgt, src = _path(target, "target"), _path(source, "source")
    if tgt[:len(src)] == src or src[:len(tgt)] == tgt:
        raise ValueError(f"tied: target {'/'.join(tgt)} and source {'/'.join(src)} overlap")
    name = f"tied({layer.name}, {'/'.join(tgt)}={'/'.join(src)}{'ᵀ' if transpose else ''})"
    view = (lambda a: a.T) if transpose else (lambda a: a)

    def init(key, input_shape):
        params, state, out = layer.init(key, input_shape)
        s, t = _get(params, src, name), _get(params, tgt, name)
        if jnp.shape(t) != jnp.shape(view(s)):
            raise ValueError(f"{name}: {'/'.join(tgt)} has shape {jnp.shape(t)} but "
                             f"{'/'.join(src)}{'ᵀ' if transpose else ''} has "
                             f"{jnp.shape(view(s))}")
        return _pop(params, tgt)[0], state, out

    def full(params):
        return _put(params, tgt, view(_get(params, src, name)))

    def apply(params, state, x, *, key=None, train=False, **kw):
        return layer.apply(full(params), state, x, key=key, train=train, **kw)

    def fwd(params, state, x, *, key=None, train=False, **kw):
        return layer.fwd(full(params), state, x, key=key, train=train, **kw)

    def bwd(params, state, res, dy, *, key=None, train=False, **kw):
        grads, dx = layer.bwd(full(params), state, res, dy, key=key, train=train, **kw)
        grads, dt = _pop(grads, tgt)
        return _put(grads, src, _get(grads, src, name) + view(dt)), dx

    return Layer(init, apply, fwd, bwd, name, "tied", layer.keywords, (("layer", layer),),
                 layer.stochastic, {"target": tgt, "source": src, "transpose": transpose})
