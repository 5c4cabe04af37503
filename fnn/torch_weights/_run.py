"""The walk run as a load, a save or a listing of keys (:mod:`fnn.torch_weights`'s engine,
shared with :mod:`fnn.models.hub`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fnn.torch_weights import _padding, _sinks, _walk


class StateDictError(ValueError):
    """A ``state_dict`` that does not fit the model: missing, unexpected, mis-shaped or mis-typed
    tensors, tied aliases that differ, wrong declarations."""


StateDictError.__module__ = "fnn.torch_weights"


def templates(model, shape):
    return jax.eval_shape(lambda k: model.init(k, shape)[:2],
                          jax.eval_shape(jax.random.PRNGKey, 0))


def walk_model(sink, model, shape, pt, st, mapping, layout):
    walk = _walk.Walk(sink, mapping, layout)
    walk.node(model, shape, pt, st, "", (), (), "")
    sink.finish(walk)
    return walk


def raise_problems(walk, model, what, extra=()):
    problems = walk.problems + list(extra) + walk.unused()
    if problems:
        raise StateDictError(f"{what}: {model.name} and its PyTorch names do not fit "
                             f"({len(problems)} problems):\n  "
                             + "\n  ".join(problems + list(walk.hints.values())))


def check_trees(model, params, state, pt, st):
    for name, got, want in (("params", params, pt), ("state", state, st)):
        g = {"/".join(k[1]): np.shape(v) for k, v in _sinks.leaves(got, name).items()}
        w = {"/".join(k[1]): tuple(v.shape) for k, v in _sinks.leaves(want, name).items()}
        bad = sorted(f"{k or '<root>'}: given {g.get(k, 'nothing')}, {model.name} has "
                     f"{w.get(k, 'nothing')}" for k in set(g) | set(w) if g.get(k) != w.get(k))
        if bad:
            raise StateDictError(f"state_dict: the {name} do not fit {model.name} at this "
                                 f"input shape ({len(bad)} differences):\n  " + "\n  ".join(bad))


def save(model, params, state, input_shape, mapping=None, layout=None, dtype=None):
    """``(state_dict, aliases)``: the keys that are tied copies of another (for hub files)."""
    shape = tuple(input_shape)
    pt, st = templates(model, shape)
    check_trees(model, params, state, pt, st)
    sink = _sinks.Saver(params, state, dtype)
    walk = walk_model(sink, model, shape, pt, st, mapping, layout)
    raise_problems(walk, model, "state_dict")
    return sink.sd, sink.aliases


def keys(model, input_shape, mapping=None, layout=None):
    """``({key: torch shape}, aliases)`` that :func:`state_dict` writes, without arrays."""
    shape = tuple(input_shape)
    pt, st = templates(model, shape)
    sink = _sinks.Keys()
    walk = walk_model(sink, model, shape, pt, st, mapping, layout)
    raise_problems(walk, model, "state_dict")
    return sink.sd, sink.aliases


def load(model, sd, input_shape, mapping=None, layout=None, dtype=None):
    """``(params, state)`` from ``sd`` (``{key: NumPy array}``)."""
    shape = tuple(input_shape)
    pt, st = templates(model, shape)
    sink = _sinks.Loader(sd, pt, st)
    walk = walk_model(sink, model, shape, pt, st, mapping, layout)
    raise_problems(walk, model, "load_state_dict",
                   [f"unexpected: {k!r} {tuple(sd[k].shape)} is not used by the model"
                    for k in sd if k not in sink.used])
    _padding.warn(walk)                      # a SAME-padded conv: its outputs may not be torch's
    dtype = dtype or jnp.zeros(()).dtype
    arrays = sink.arrays

    def leaves(tree, name):
        return [arrays[k] for k in _sinks.leaves(tree, name)]
    cast = lambda a, t: jnp.asarray(a, dtype if _sinks.is_float(t.dtype) else t.dtype)
    out = [jax.tree.unflatten(jax.tree.structure(t), [cast(a, s) for a, s in
                                                      zip(leaves(t, n), jax.tree.leaves(t))])
           for t, n in ((pt, "params"), (st, "state"))]
    return out[0], out[1]
