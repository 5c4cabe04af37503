"""The lesson's debugging checklist as a function: :func:`checklist` runs it on a model and data.

The checklist (``Debugging Neural Networks`` in the lesson), and what each check does here:

1. **Overfit a single batch first** (``"overfit"``): a few hundred steps of Adam on 10
   examples (one compiled ``lax.scan``) must drive the loss near zero (below 10% of its start,
   or below 1e-3). A model that cannot memorize 10 examples has a bug.
2. **Check your data pipeline** (``"data"``): inputs and float targets finite; integer labels
   in ``[0, classes)`` and token ids in the vocabulary (:func:`fnn.checks.check_data`);
   features normalized (every feature's mean within ±3 and std at most 3, and not all tiny).
3. **Monitor gradient norms** (``"gradients"``): the hand-derived gradient of every layer at
   initialization; a layer that gets no gradient, vanishing (``< 1e-6`` of the largest) or
   exploding (``> 1e3``, or above 100 times its weights' norm) norms, ReLUs that output zero
   for every example (dead units), and a cross-entropy far above ``log(classes)`` (its info
   line shows the initial loss next to that chance level, ``ln C``).
4. **Start simple** (``"size"``): the parameter count, and advice when it is large.
5. **Use gradient checking** (``"backward"``): the hand-derived gradient
   (:mod:`fnn.backprop`) against ``jax.grad`` and both against central finite differences
   (:func:`fnn.gradcheck.check_model`; float64 only — without ``jax_enable_x64`` this compares
   against ``jax.grad`` alone and says so).

A check that raises (a shape error in the model, say) is reported as an error finding of that
check, and the others still run. Each finding has a severity (``ok``, ``info``, ``warning``, ``error``) and a plain-words
message; ``str(report)`` lists them, ``report.errors`` holds the errors. When the data check
finds an error (a NaN input, a label out of range) the other checks are skipped: their numbers
would be meaningless.

>>> import fnn
>>> from fnn import losses
>>> from fnn.layers import Dense, Relu, serial
>>> model = serial(Dense(16), Relu(), Dense(3))
>>> x, y = jax.random.normal(jax.random.PRNGKey(0), (12, 4)), jnp.arange(12) % 3
>>> report = fnn.debug.checklist(model, losses.softmax_cross_entropy_with_integer_labels,
...                              (x, y.at[0].set(5)))           # a label out of range
>>> print(report)                                            # or: fnn doctor digits-mlp
fnn.debug.checklist: 1 error, 0 warnings
  ERROR   data      softmax_cross_entropy_with_integer_labels: label 5 at index (0,) is ...
  INFO    size      skipped: fix the data errors first
  INFO    gradients skipped: fix the data errors first
  INFO    backward  skipped: fix the data errors first
  INFO    overfit   skipped: fix the data errors first
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, checks, gradcheck, optim
from fnn.core import count_params, output_shape

__all__ = ["checklist", "Finding", "Report", "CHECKS"]

CHECKS = ("data", "size", "gradients", "backward", "overfit")
_RANK = {"ok": 0, "info": 1, "warning": 2, "error": 3}


class Finding(NamedTuple):
    """One result: ``check`` (one of :data:`CHECKS`), ``severity`` (``"ok"``, ``"info"``,
    ``"warning"``, ``"error"``) and a plain-words ``message``."""

    check: str
    severity: str
    message: str


class Report:
    """The findings of :func:`checklist`, in checklist order; ``str()`` renders them."""

    def __init__(self, findings, title="fnn.debug.checklist"):
        self.findings, self.title = list(findings), title

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        """No error-level finding (warnings allowed)."""
        return not self.errors

    def of(self, check: str) -> list[Finding]:
        """The findings of one check."""
        return [f for f in self.findings if f.check == check]

    def __bool__(self):
        return self.passed

    def __str__(self):
        n_e, n_w = len(self.errors), len(self.warnings)
        head = f"{self.title}: {n_e} error{'s' * (n_e != 1)}, {n_w} warning{'s' * (n_w != 1)}"
        lines = [f"  {f.severity.upper() if f.severity != 'ok' else 'ok':8s}{f.check:10s}"
                 f"{f.message}" for f in self.findings]
        return "\n".join([head] + lines)

    __repr__ = __str__


# --------------------------------------------------------------------------- 2. data

def _nonfinite(what, a):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    i = tuple(int(j) for j in np.unravel_index(int(np.flatnonzero(bad)[0]), a.shape))
    return (f"{int(bad.sum())} of {a.size} {what} values are NaN or infinite (the first at "
            f"index {i}): fix the data pipeline before anything else")


def _normalization(x):
    x = np.asarray(x, np.float64)
    feats = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(-1, 1)
    mean, std = feats.mean(0), feats.std(0)
    j = int(np.argmax(np.maximum(np.abs(mean), std)))
    where = f"inputs range from {x.min():.3g} to {x.max():.3g}"
    if abs(mean[j]) > 3 or std[j] > 3:
        return "warning", (f"inputs are not normalized: feature {j} (last axis) has mean "
                           f"{mean[j]:.3g} and std {std[j]:.3g}; {where}. Standardize each feature "
                           f"(subtract the training mean, divide by the std) or scale to [0, 1]")
    if std.max() < 1e-2 and np.abs(x).max() > 0:
        return "warning", (f"inputs are not normalized: every feature has std below 0.01 (the "
                           f"largest is {std.max():.2g}); {where}. Scale them to unit std")
    return "ok", (f"inputs look normalized: feature means within ±{np.abs(mean).max():.2g}, "
                  f"stds up to {std.max():.2g} (per feature on the last axis)")


def _data(model, loss, x, target):
    out = []
    if np.shape(x)[:1] != np.shape(target)[:1]:
        return [Finding("data", "error", f"{np.shape(x)[0]} inputs but {np.shape(target)[0]} "
                                         f"targets: the leading (example) axes must agree")]
    for what, a in (("input", x), ("target", target)):
        msg = _nonfinite(what, a)
        if msg:
            out.append(Finding("data", "error", msg))
    try:
        checks.check_data(model, loss, x, target)
        what = [w for w, on in (("labels", getattr(loss, "integer_labels", False)),
                                ("token ids", np.issubdtype(np.asarray(x).dtype, np.integer)))
                if on]
        if what:
            out.append(Finding("data", "ok", f"{' and '.join(what)} are within range"))
    except ValueError as e:
        out.append(Finding("data", "error", f"{e}. Check how labels are encoded (0-based "
                                            f"class indices) and the model's output width"))
    if np.issubdtype(np.asarray(x).dtype, np.floating) and not any(f.severity == "error"
                                                                    for f in out):
        out.append(Finding("data", *_normalization(x)))
    return out


# --------------------------------------------------------------------------- 4. size

def _size(params):
    n = count_params(params)
    if n > 5_000_000:
        return [Finding("size", "info", f"{n:,} parameters: get a small version of this model "
                                        f"working first, then scale up")]
    return [Finding("size", "ok", f"{n:,} parameters: small enough to debug")]


# --------------------------------------------------------------------------- 3. gradients

def _path(kp) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)


def _layer_norms(grads) -> dict[str, float]:
    """``{layer path: ‖g‖₂}``, grouping each layer's arrays (path minus the last key)."""
    sq: dict[str, float] = {}
    for kp, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = _path(kp[:-1]) or _path(kp)
        sq[name] = sq.get(name, 0.0) + float(np.sum(np.square(np.asarray(g, np.float64))))
    return {k: math.sqrt(v) if math.isfinite(v) else v for k, v in sq.items()}


def _relus(model, params, state, x, path=""):
    """``(path, relu output)`` for every ``Relu`` in the model's (nested) ``serial`` chain."""
    if model.kind != "serial":
        return []
    out = []
    for name, child in model.children:
        p = f"{path}/{name}" if path else name
        if child.kind == "serial":
            out += _relus(child, params[name], state[name], x, p)
        y, _ = child.apply(params[name], state[name], x)
        if child.kind == "Relu":
            out.append((p, y))
        x = y
    return out


def _dead_relus(model, params, state, x):
    out = []
    for path, y in _relus(model, params, state, x):
        y = np.asarray(y).reshape(-1, np.shape(y)[-1])
        dead = int(np.sum(~np.any(y > 0, axis=0)))
        if dead and dead >= y.shape[1] // 2:
            out.append(Finding("gradients", "error" if dead == y.shape[1] else "warning",
                               f"layer {path!r} (Relu): {dead} of {y.shape[1]} units are zero on "
                               f"every example (dead ReLUs), so no gradient flows through them: "
                               f"the layer before it pushes them negative; check its "
                               f"initialization and bias (He-normal weights, zero bias)"))
    return out


def _classes(loss, model, x):
    """``C``, the number of classes, for a cross-entropy over integer labels of one array of
    ``C`` logits; else ``None``."""
    if not getattr(loss, "integer_labels", False):
        return None
    out = output_shape(model, tuple(np.shape(x)))
    if not out or not all(isinstance(d, (int, np.integer)) for d in out):
        return None                                        # not one array of logits
    return int(out[-1]) if int(out[-1]) >= 2 else None


def _initial_loss(loss, value, params, state, x, model):
    """Cross-entropy over ``C`` classes starts near ``log C``; far above it, the initial outputs
    are confidently wrong (too large initial weights)."""
    c = _classes(loss, model, x)
    if c is None or value <= 3 * math.log(c) + 1:
        return []
    return [Finding("gradients", "warning",
                    f"the loss at initialization, {value:.4g}, is far above log({c}) = "
                    f"{math.log(c):.3g}, the loss of uniform guesses: the initial outputs are "
                    f"large and confidently wrong; scale down the initial weights")]


def _gradients(model, loss, params, state, x, target, key):
    vg = jax.jit(backprop.value_and_grad(model, loss), static_argnames="train")
    (value, _), grads = vg(params, state, x, target, key=key, train=True)
    value = float(value)
    if not math.isfinite(value):
        return [Finding("gradients", "error", f"the loss at initialization is {value}: look "
                                              f"for a log of 0, a division by 0 or overflow")]
    norms, weights = _layer_norms(grads), _layer_norms(params)
    out = _dead_relus(model, params, state, x) + _initial_loss(loss, value, params, state, x,
                                                                model)
    top = max(norms.values(), default=0.0)
    for name, g in norms.items():
        w = weights.get(name, 0.0)
        if not math.isfinite(g) or g > 1e3 or (w > 0 and g > 100 * w):
            out.append(Finding("gradients", "error" if not math.isfinite(g) else "warning",
                               f"layer {name!r}: gradient norm {g:.3g} at initialization (its "
                               f"weights' norm is {w:.3g}) is exploding: use smaller initial "
                               f"weights, normalization, or gradient clipping"))
        elif g == 0.0:
            out.append(Finding("gradients", "error", f"layer {name!r} gets no gradient at all "
                                                     f"(norm 0): nothing it does reaches the loss "
                                                     f"(dead units after it, or a detached path)"))
        elif g < 1e-6 * top:
            out.append(Finding("gradients", "warning",
                               f"layer {name!r}: gradient norm {g:.2g} is vanishing (the largest "
                               f"is {top:.2g}): check the initialization and the activations "
                               f"between it and the loss"))
    order = lambda k: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in k.split("/")]
    shown = ", ".join(f"{k} {norms[k]:.2g}" for k in sorted(norms, key=order))
    c = _classes(loss, model, x)
    chance = "" if c is None else f", chance ln {c} = {math.log(c):.4g}"   # uniform guesses
    out.append(Finding("gradients", "info", f"initial loss {value:.4g}{chance}; gradient "
                                            f"norm per layer: {shown}"))
    return out


# --------------------------------------------------------------------------- 5. backward

def _backward(model, loss, params, state, x, target):
    x64 = jax.config.jax_enable_x64
    tol = 1e-6 if x64 else 1e-3
    f = lambda p: loss(model.apply(p, state, x, train=False)[0], target)
    hand = backprop.grad(model, loss)
    manual, auto = jax.jit(lambda p: (hand(p, state, x, target, train=False),
                                      jax.grad(f)(p)))(params)        # one compilation
    out, bad = [], {}
    for (kp, m), a in zip(jax.tree_util.tree_flatten_with_path(manual)[0], jax.tree.leaves(auto)):
        m, a = np.asarray(m, np.float64), np.asarray(a, np.float64)
        rel = float(np.max(np.abs(m - a)) / max(np.max(np.abs(a)), 1e-30)) if m.size else 0.0
        if not rel <= tol:
            bad[jax.tree_util.keystr(kp)] = (_path(kp), rel)
    fd_bad = set()
    if x64:
        rep = gradcheck.check_grad(f, params, grad_fn=lambda p: manual, autodiff=False,
                                   mode="directional", num_directions=2, raise_on_fail=False,
                                   grad_name="hand-derived")
        fd_bad = {r.leaf for r in rep.failures() if r.leaf != "<global>"}
    for leaf, (path, rel) in bad.items():
        fd = " and from finite differences" if leaf in fd_bad else ""
        out.append(Finding("backward", "error",
                           f"the hand-derived gradient of {path!r} differs from jax.grad "
                           f"(relative difference {rel:.2g}){fd}: the backward of the layer at "
                           f"{path.rsplit('/', 1)[0] if '/' in path else '<root>'!r} is wrong"))
    for leaf in sorted(fd_bad - set(bad)):
        out.append(Finding("backward", "warning",
                           f"finite differences disagree with the hand-derived gradient and "
                           f"jax.grad alike on {leaf}: a kink (ReLU at 0, max) at this point, "
                           f"or a non-differentiable step"))
    if not x64:
        out.append(Finding("backward", "info", "finite differences skipped: they need float64 "
                                               "(jax.config.update('jax_enable_x64', True); "
                                               "fnn doctor enables it)"))
    if not out or (not bad and not fd_bad):
        fd = " and finite differences" if x64 else ""
        out.insert(0, Finding("backward", "ok", f"the hand-derived gradient matches "
                                                f"jax.grad{fd}"))
    return out


# --------------------------------------------------------------------------- 1. overfit

def _overfit(model, loss, params, state, x, target, key, steps, lr):
    n = int(np.shape(x)[0])
    opt = optim.adam(lr)
    vg = backprop.value_and_grad(model, loss)

    @jax.jit
    def run(params, state, x, target):
        def step(carry, i):
            p, s, o = carry
            (value, s), g = vg(p, s, x, target, key=jax.random.fold_in(key, i), train=True)
            u, o = opt.update(g, o, p)
            return (optim.apply_updates(p, u), s, o), value
        return jax.lax.scan(step, (params, state, opt.init(params)), jnp.arange(steps))[1]

    losses = np.asarray(run(params, state, x, target), np.float64)
    first, last = losses[0], losses[-5:].min()
    done = f"{first:.4g} → {last:.4g} in {steps} steps of Adam (learning rate {lr:g})"
    if not np.all(np.isfinite(losses)):
        k = int(np.flatnonzero(~np.isfinite(losses))[0])
        return [Finding("overfit", "error", f"training on {n} examples: the loss became "
                                            f"{losses[k]} at step {k}: lower the learning rate, "
                                            f"check for log(0) or overflow")]
    if last <= 0.1 * first or last < 1e-3:
        return [Finding("overfit", "ok", f"memorizes {n} examples: loss {done}")]
    return [Finding("overfit", "error",
                    f"cannot drive the loss of {n} examples near zero: {done}. A model that "
                    f"cannot memorize {n} examples has a bug: check that labels match inputs, "
                    f"the loss fits the output (logits, not probabilities), and the gradients")]


# --------------------------------------------------------------------------- the checklist

def checklist(model, loss, data, *, params=None, state=None, key=None, checks=CHECKS,
              overfit_examples: int = 10, overfit_steps: int = 200,
              learning_rate: float = 1e-2) -> Report:
    """Run the debugging checklist on ``model``, ``loss`` and ``data = (x, target)``.

    **Arguments:** ``params``/``state``: the model's (default ``model.init(key, x.shape)``);
    ``key``: for ``init`` and dropout (default ``PRNGKey(0)``); ``checks``: a subset of
    :data:`CHECKS`; ``overfit_examples``, ``overfit_steps``, ``learning_rate``: the overfit
    test (the first examples of ``data``; Adam). Use a small batch: the gradient checks
    evaluate the whole of ``data`` (a few dozen examples are plenty).
    **Returns:** a :class:`Report`; ``report.passed`` is ``False`` if any finding is an error.
    """
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"fnn.debug.checklist: unknown checks {sorted(unknown)}; "
                         f"choose from {list(CHECKS)}")
    x, target = data
    key = jax.random.PRNGKey(0) if key is None else key
    findings = _data(model, loss, x, target) if "data" in checks else []
    if any(f.severity == "error" for f in findings):
        rest = [c for c in CHECKS[1:] if c in checks]
        return Report(findings + [Finding(c, "info", "skipped: fix the data errors first")
                                  for c in rest])
    if params is None or state is None:
        p0, s0, _ = model.init(key, tuple(np.shape(x)))
        params, state = (p0 if params is None else params), (s0 if state is None else state)
    n = overfit_examples
    runs = {"size": lambda: _size(params),
            "gradients": lambda: _gradients(model, loss, params, state, x, target, key),
            "backward": lambda: _backward(model, loss, params, state, x, target),
            "overfit": lambda: _overfit(model, loss, params, state, x[:n], target[:n], key,
                                        overfit_steps, learning_rate)}
    for name in CHECKS[1:]:
        if name in checks:
            findings += _guarded(name, runs[name])
    return Report(findings)


def _guarded(name, run):
    """A check that raises becomes an error finding, so the other checks still report."""
    try:
        return run()
    except Exception as e:                                              # noqa: BLE001
        return [Finding(name, "error", f"the check could not run: {type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}")]
