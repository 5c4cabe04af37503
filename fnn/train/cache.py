"""Reuse of compiled epochs: functions that compute the same thing compare equal here.

A model built from fnn's constructors is its own key: a ``Layer`` has structural identity
(``fnn.core.constructor``: the same constructor with equal arguments gives an equal layer). The
code fingerprint below remains for what has no such identity: losses, optimizers (optax's are
closures; fnn's keep the learning rate in their state so that optimizers differing only in the
rate share one program), metrics, augmentation functions and layers a user built without
``@constructor``.

``jax.jit`` caches on the identity of the function, so ``fit(..., optim.sgd(0.01))`` in a loop
(a fresh optimizer, loss or model each time: new closures) would recompile every call. The
builders of compiled epochs are memoised on a :func:`fingerprint` of their arguments instead: a
function's fingerprint is its code object with the fingerprints of its defaults and of the
values its closure captured (recursively), so two closures made by the same ``def`` from equal
values are equal. Numbers, strings, tuples, NamedTuples, lists, dicts and frozensets compare by
their contents; other objects (arrays, modules, classes, jitted functions) by identity, so a
match is never a guess. The globals a function reads count too: numbers, strings and tuples by
value (a constant changed in a re-run notebook cell gives a new fingerprint), anything else by
identity. The very same argument objects as a recent call are found by identity first, without
a fingerprint (as ``jax.jit`` itself caches), so mutating a list a closure holds between two
``fit`` calls is not seen. The learning rate of fnn's optimizers is optimizer *state*, so
optimizers that differ only in their rate share one program.
"""
from __future__ import annotations

import collections
import functools
import types

from fnn._identity import Same
from fnn.core import Layer

_VALUES = (type(None), bool, int, str, bytes)
_EXACT_VALUES = frozenset(_VALUES)


def _cells(fn, path, memo):
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(fingerprint(cell.cell_contents, path, memo))
        except ValueError:                      # an empty cell (a name not yet bound)
            out.append("<empty>")
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _global_names(code) -> tuple:
    """The names ``code`` (and the code nested in it) may read as globals, sorted."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.update(_global_names(c))
    return tuple(sorted(names))


_IMMUTABLE = _VALUES + (float, complex, tuple, frozenset)


def _globals(fn, path, memo):
    """The globals ``fn``'s code reads: immutable values by value, the rest by identity."""
    g = fn.__globals__
    return tuple((name, fingerprint(g[name], path, memo) if isinstance(g[name], _IMMUTABLE)
                  else Same(g[name])) for name in _global_names(fn.__code__) if name in g)


def fingerprint(obj, _path=(), _memo=None):
    """A hashable stand-in for ``obj``: equal for objects that compute the same thing.

    Each object is fingerprinted once per call (``_memo``, by identity); a later visit gives
    ``("<seen>", i)``, the order of its first visit. A model's ``apply``, ``fwd``, ``bwd`` and
    ``backward`` close over the same children, which a plain recursion (and the hash of the
    nested result) would visit once per path — exponentially many in the depth of the model.
    The visit order depends only on the structure, so equal structures still compare equal.

    Example: ``fingerprint(optim.sgd(0.01).update) == fingerprint(optim.sgd(0.02).update)``.
    """
    memo = {} if _memo is None else _memo
    kind = type(obj)
    if kind in _EXACT_VALUES or kind is float or kind is complex:
        return _fingerprint(obj, _path, memo)
    hit = memo.get(id(obj))
    if hit is not None and hit[0] is obj:
        return "<seen>", hit[1]
    memo[id(obj)] = (obj, len(memo))
    return _fingerprint(obj, _path, memo)


def _fingerprint(obj, _path, memo):
    kind = type(obj)
    if kind in _EXACT_VALUES:
        return kind, obj
    if kind is float or kind is complex:
        return kind, repr(obj)                         # nan == nan, -0.0 != 0.0
    if isinstance(obj, _VALUES):
        return kind, obj
    for depth, seen in enumerate(_path):               # a cycle: where it points back to
        if seen is obj:
            return "<cycle>", depth
    if isinstance(obj, Layer) and obj.spec is not None:
        return Layer, obj                              # structural identity: its own == and hash
    path = _path + (obj,)
    if isinstance(obj, (tuple, list)):                 # NamedTuples included: the type counts
        return type(obj), tuple(fingerprint(x, path, memo) for x in obj)
    if isinstance(obj, dict):
        return type(obj), tuple((fingerprint(k, path, memo), fingerprint(v, path, memo))
                                for k, v in obj.items())
    if isinstance(obj, frozenset):
        return frozenset, frozenset(fingerprint(x, path, memo) for x in obj)
    if isinstance(obj, types.FunctionType):
        d, kd = obj.__defaults__, obj.__kwdefaults__
        return (types.FunctionType, obj.__code__, d and fingerprint(d, path, memo),
                kd and fingerprint(tuple(sorted(kd.items())), path, memo),
                obj.__closure__ and _cells(obj, path, memo), _globals(obj, path, memo))
    if isinstance(obj, functools.partial):
        return (functools.partial, fingerprint(obj.func, path, memo),
                fingerprint(obj.args, path, memo),
                fingerprint(tuple(sorted(obj.keywords.items())), path, memo))
    if isinstance(obj, types.MethodType):
        return (types.MethodType, fingerprint(obj.__func__, path, memo),
                fingerprint(obj.__self__, path, memo))
    return Same(obj)


def _ident(a):
    if type(a) in _EXACT_VALUES:
        return type(a), a
    return tuple(_ident(x) for x in a) if type(a) is tuple else id(a)


def _same(a, b):
    if a is b:
        return True
    if type(a) is tuple and type(b) is tuple:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) in _EXACT_VALUES and type(a) is type(b) and a == b


def cached(build, maxsize: int = 32):
    """Memoise ``build(*args)`` on the fingerprints of its arguments (least recently used out
    after ``maxsize``). The same argument objects as a recent call skip the fingerprint (as
    ``jax.jit`` caches on identity); new objects that compute the same thing find the entry by
    fingerprint."""
    memo, by_id = collections.OrderedDict(), collections.OrderedDict()

    @functools.wraps(build)
    def get(*args):
        ident = tuple(_ident(a) for a in args)
        hit = by_id.get(ident)
        if hit is not None and _same(hit[0], args):
            return hit[1]
        key = fingerprint(args)
        if key in memo:
            memo.move_to_end(key)
            out = memo[key]
        else:
            memo[key] = out = build(*args)
            if len(memo) > maxsize:
                memo.popitem(last=False)
        by_id[ident] = (args, out)          # keeps args alive: their ids stay theirs
        if len(by_id) > maxsize:
            by_id.popitem(last=False)
        return out

    def clear():
        memo.clear()
        by_id.clear()
    get.cache_clear = clear
    return get
