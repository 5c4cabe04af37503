"""Reuse of compiled epochs: functions that compute the same thing compare equal here.

``jax.jit`` caches on the identity of the function, so ``fit(..., optim.sgd(0.01))`` in a loop
(a fresh optimizer, loss or model each time: new closures) would recompile every call. The
builders of compiled epochs are memoised on a :func:`fingerprint` of their arguments instead: a
function's fingerprint is its code object with the fingerprints of its defaults and of the
values its closure captured (recursively), so two closures made by the same ``def`` from equal
values are equal. Numbers, strings, tuples, NamedTuples, lists, dicts and frozensets compare by
their current contents (a list mutated later gives a new fingerprint); other objects (arrays,
modules, classes, jitted functions) by identity, so a match is never a guess. The globals a
function reads count too: numbers, strings and tuples by value (a constant changed in a re-run
notebook cell gives a new fingerprint), anything else by identity. The learning rate of fnn's optimizers is optimizer *state*, so
optimizers that differ only in their rate share one program.
"""
from __future__ import annotations

import collections
import functools
import types

_VALUES = (type(None), bool, int, str, bytes)


class _Same:
    """Identity: equal only to a wrapper of the same object (which it keeps alive)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _cells(fn, path):
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(fingerprint(cell.cell_contents, path))
        except ValueError:                      # an empty cell (a name not yet bound)
            out.append("<empty>")
    return tuple(out)


def _global_names(code) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _globals(fn, path):
    """The globals ``fn``'s code reads: immutable values by value, the rest by identity."""
    g = fn.__globals__
    out = []
    for name in sorted(_global_names(fn.__code__)):
        if name in g:
            v = g[name]
            immutable = isinstance(v, _VALUES + (float, complex, tuple, frozenset))
            out.append((name, fingerprint(v, path) if immutable else _Same(v)))
    return tuple(out)


def fingerprint(obj, _path=()):
    """A hashable stand-in for ``obj``: equal for objects that compute the same thing.

    Example: ``fingerprint(optim.sgd(0.01).update) == fingerprint(optim.sgd(0.02).update)``.
    """
    if isinstance(obj, _VALUES):
        return type(obj), obj
    if isinstance(obj, (float, complex)):
        return type(obj), repr(obj)                    # nan == nan, -0.0 != 0.0
    for depth, seen in enumerate(_path):               # a cycle: where it points back to
        if seen is obj:
            return "<cycle>", depth
    path = _path + (obj,)
    if isinstance(obj, (tuple, list)):                 # NamedTuples included: the type counts
        return type(obj), tuple(fingerprint(x, path) for x in obj)
    if isinstance(obj, dict):
        return type(obj), tuple((fingerprint(k, path), fingerprint(v, path))
                                for k, v in obj.items())
    if isinstance(obj, frozenset):
        return frozenset, frozenset(fingerprint(x, path) for x in obj)
    if isinstance(obj, types.FunctionType):
        return (types.FunctionType, obj.__code__, fingerprint(obj.__defaults__, path),
                fingerprint(tuple(sorted((obj.__kwdefaults__ or {}).items())), path),
                _cells(obj, path), _globals(obj, path))
    if isinstance(obj, functools.partial):
        return (functools.partial, fingerprint(obj.func, path), fingerprint(obj.args, path),
                fingerprint(tuple(sorted(obj.keywords.items())), path))
    if isinstance(obj, types.MethodType):
        return types.MethodType, fingerprint(obj.__func__, path), fingerprint(obj.__self__, path)
    return _Same(obj)


def cached(build, maxsize: int = 32):
    """Memoise ``build(*args)`` on the fingerprints of its arguments (least recently used out
    after ``maxsize``)."""
    memo = collections.OrderedDict()

    @functools.wraps(build)
    def get(*args):
        key = fingerprint(args)
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
        memo[key] = out = build(*args)
        if len(memo) > maxsize:
            memo.popitem(last=False)
        return out
    get.cache_clear = memo.clear
    return get
