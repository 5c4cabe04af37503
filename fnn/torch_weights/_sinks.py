"""What the walk does with each tensor rule: :class:`Loader` reads a state_dict into fnn
arrays (recording every problem), :class:`Saver` writes fnn arrays into a state_dict."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_float(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def leaves(tree, name):
    """``{(name, keys): leaf}`` for a nested-dict tree."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[(name, tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp))] = leaf
    return out


def _tied(walk, ref):
    return walk.tied_targets.get((ref.keys, ref.index))


class Loader:
    def __init__(self, sd, pt, st):
        self.sd, self.used = sd, set()
        self.arrays = {k: np.zeros(s.shape, np.float64 if is_float(s.dtype) else s.dtype)
                       for k, s in {**leaves(pt, "params"), **leaves(st, "state")}.items()}
        self.tied = []                       # (keys, target Ref, value) read for tied targets

    def has(self, key):
        return key in self.sd

    def take(self, walk, b):
        rule, arrays, missing, ok = b.rule, [], [], True
        for k, shape in zip(rule.keys, rule.shapes):
            if k not in self.sd:
                missing.append((k, shape))
                continue
            self.used.add(k)
            a = self.sd[k]
            if tuple(a.shape) != tuple(shape):
                walk.problems.append(f"shape: {k!r} is {tuple(a.shape)}, {b.where} needs "
                                     f"{tuple(shape)}")
                ok = False
            elif not rule.integer and not is_float(a.dtype):   # a counter's value is not used
                walk.problems.append(f"dtype: {k!r} is {a.dtype}, {b.where} needs a "
                                     f"floating-point tensor")
                ok = False
            arrays.append(a)
        if missing and (rule.optional or (b.tied and len(missing) == len(rule.keys))):
            return                              # a counter, or an alias: absent is fine
        walk.problems += [f"missing: {k!r} {tuple(s)} for {b.where}" for k, s in missing]
        if missing or not ok:
            return
        values = rule.to_fnn(*(a if rule.integer else a.astype(np.float64) for a in arrays))
        for ref, v in zip(b.refs, values):
            if _tied(walk, ref):
                self.tied.append((rule.keys, ref, v))
                continue
            slot = self.arrays[(ref.tree, ref.keys)]
            assert slot[ref.index].shape == np.shape(v), (ref, np.shape(v))
            slot[ref.index] = v

    def finish(self, walk):
        """Check tied targets and declared aliases against their sources."""
        for keys, ref, v in self.tied:
            src, transpose = _tied(walk, ref)
            s = self.arrays[("params", src)][ref.index]
            if not np.array_equal(v, s.T if transpose else s):
                walk.problems.append(
                    f"tied: {', '.join(map(repr, keys))} differs from the parameter "
                    f"{'/'.join(src)} it is tied to ({'transposed, ' if transpose else ''}"
                    f"fnn stores one copy)")
        for alias, source in walk.aliases.items():
            if alias not in self.sd:
                continue
            self.used.add(alias)
            a, s = self.sd[alias], self.sd.get(source)
            if s is None or a.shape != s.shape or not np.array_equal(a, s):
                what = "is not in the state_dict" if s is None else "holds different values"
                walk.problems.append(f"tied: {alias!r} is declared tied to {source!r}, which "
                                     f"{what}")


class Saver:
    def __init__(self, params, state, dtype=None):
        self.leaves = {k: np.asarray(v) for k, v in {**leaves(params, "params"),
                                                     **leaves(state, "state")}.items()}
        self.dtype, self.sd, self.aliases = dtype, {}, set()

    def has(self, key):
        return False

    def get(self, walk, ref):
        tie = _tied(walk, ref)
        if tie:
            s = self.get(walk, ref._replace(keys=tie[0]))
            return s.T if tie[1] else s
        return self.leaves[(ref.tree, ref.keys)][ref.index]

    def take(self, walk, b):
        outs = b.rule.to_torch(*(self.get(walk, r) for r in b.refs))
        for k, a in zip(b.rule.keys, outs):
            if k in self.sd:
                walk.problems.append(f"duplicate: {b.where} writes {k!r}, which another layer "
                                     f"wrote (two fnn layers have the same PyTorch name)")
            a = np.array(a, order="C")                   # a copy; keeps a 0-d array 0-d
            if self.dtype is not None and is_float(a.dtype):
                a = a.astype(self.dtype)
            self.sd[k] = a
            if b.tied:
                self.aliases.add(k)

    def finish(self, walk):
        for alias, source in walk.aliases.items():
            if source not in self.sd:
                walk.problems.append(f"tied: {alias!r} is declared tied to {source!r}, which "
                                     f"the model does not write")
                continue
            self.sd[alias] = self.sd[source].copy()
            self.aliases.add(alias)


class Keys(Saver):
    """The PyTorch keys a model reads/writes (no arrays): ``sd`` maps each to its shape."""

    def __init__(self):
        self.sd, self.aliases = {}, set()

    def take(self, walk, b):
        self.sd.update(zip(b.rule.keys, b.rule.shapes))
        if b.tied:
            self.aliases.update(b.rule.keys)

    def finish(self, walk):
        for alias, source in walk.aliases.items():
            self.sd[alias] = self.sd.get(source)
            self.aliases.add(alias)
