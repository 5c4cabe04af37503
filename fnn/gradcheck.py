"""Finite-difference gradient checks for any scalar function of a pytree.

The reference is the central difference ``(f(θ + h·v) − f(θ − h·v)) / 2h`` in float64, held
against ``jax.grad(f)`` (autodiff) and/or a gradient function you supply (``fnn.backprop.grad``,
a hand-derived formula). Two modes:

- **full**: one difference per scalar parameter (``v = e_i``), ``2n`` evaluations of ``f``;
  exact coverage, for small trees (``n <= max_full``).
- **directional**: ``num_directions`` random unit directions ``v`` per leaf (zero outside it)
  plus as many over the whole tree, comparing the directional derivative with ``⟨g, v⟩``; the
  cost does not grow with ``n``, so it scales to large models. A wrong gradient ``g + e`` shows
  as a relative error about ``‖e‖ / ‖g‖`` on that leaf.

A check passes when ``|fd − g| ≤ max(rtol·max(|fd|, |g|), atol)``; the reported relative error
is ``|fd − g| / max(|fd|, |g|, atol/rtol)``, so it passes iff ``rel_err ≤ rtol``.

**float64 is required.** Float32 central differences carry a relative error near 1e-3 (rounding
``ε/h`` against truncation ``h²``), too coarse to tell a right gradient from a slightly wrong one,
so :func:`check_grad` raises ``RuntimeError`` when ``jax_enable_x64`` is off, unless you pass
``allow_float32=True`` (then ``eps``/``rtol``/``atol`` default to float32-sized values). With x64
on, float leaves are cast to float64 before ``f`` and the gradients are evaluated; integer
leaves are held fixed and not checked. Finite differences also fail across kinks (``relu`` at
0): check at points away from them.

Usage in your own tests::

    import jax
    jax.config.update("jax_enable_x64", True)
    from fnn import backprop, gradcheck, losses

    def test_my_model_gradient():
        f = lambda p: losses.mse(model.apply(p, state, x)[0], y)
        g = lambda p: backprop.grad(model, losses.mse)(p, state, x, y, train=False)
        report = gradcheck.check_grad(f, params, grad_fn=g)   # raises GradcheckError if wrong
        print(report)                                         # worst relative error per leaf
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_grad", "check_model", "check_layer", "numerical_grad", "raise_if_failed",
           "GradcheckError", "GradcheckReport", "LeafCheck"]


class LeafCheck(NamedTuple):
    """The outcome for one gradient source on one leaf (or ``<global>``, all leaves at once).

    ``worst`` says where the largest error sits: an index (full mode) or ``dir k``; ``fd`` and
    ``grad`` are the two values compared there.
    """

    source: str
    leaf: str
    shape: tuple
    mode: str
    checks: int
    max_rel_err: float
    max_abs_err: float
    worst: str
    fd: float
    grad: float
    passed: bool


class GradcheckReport:
    """All checks of one :func:`check_grad` call; ``str(report)`` is a table, one row per leaf."""

    def __init__(self, rows, *, value, eps, rtol, atol, mode):
        self.rows, self.value, self.eps, self.rtol, self.atol, self.mode = \
            list(rows), value, eps, rtol, atol, mode

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def worst(self) -> LeafCheck:
        """The row with the largest relative error."""
        return max(self.rows, key=lambda r: r.max_rel_err)

    def failures(self) -> list[LeafCheck]:
        return [r for r in self.rows if not r.passed]

    def __bool__(self):
        return self.passed

    def __str__(self):
        head = ("gradient", "leaf", "shape", "mode", "checks", "max rel err", "max abs err",
                "worst at", "fd", "grad", "")
        cells = [head] + [(r.source, r.leaf, str(r.shape), r.mode, str(r.checks),
                           f"{r.max_rel_err:.2e}", f"{r.max_abs_err:.2e}", r.worst,
                           f"{r.fd:.6g}", f"{r.grad:.6g}", "ok" if r.passed else "FAIL")
                          for r in self.rows]
        widths = [max(len(c[j]) for c in cells) for j in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        title = (f"gradcheck {'passed' if self.passed else 'FAILED'}: f = {self.value:.6g}, "
                 f"eps = {self.eps:.1e}, rtol = {self.rtol:.1e}, atol = {self.atol:.1e}")
        return "\n".join([title, lines[0], "-" * len(lines[0])] + lines[1:])

    __repr__ = __str__


class GradcheckError(AssertionError):
    """A gradient disagrees with finite differences; ``.report`` holds every check."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- flattening

class _Flat(NamedTuple):
    """The float leaves of a tree as one host (NumPy) vector; other leaves held fixed."""

    leaves: list          # every leaf; float ones as NumPy arrays of the check dtype
    treedef: Any
    paths: list           # key-path strings of the float leaves
    index: list           # positions of the float leaves in ``leaves``
    shapes: list
    offsets: list         # start of each float leaf in the flat vector
    size: int

    def unravel(self, vec):
        """Vector -> tree; works on a NumPy vector (eagerly) and on a traced one (under jit)."""
        host = isinstance(vec, np.ndarray)
        leaves = list(self.leaves)
        for i, s, o in zip(self.index, self.shapes, self.offsets):
            piece = vec[o:o + math.prod(s)].reshape(s)
            leaves[i] = jnp.asarray(piece) if host else piece
        return jax.tree.unflatten(self.treedef, leaves)

    def ravel(self, leaves):
        return np.concatenate([np.ravel(np.asarray(leaves[i], self.leaves[i].dtype))
                               for i in self.index])

    def vector(self):
        return self.ravel(self.leaves)


def _flatten(tree, dtype) -> _Flat:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves, paths, index, shapes, offsets, size = [], [], [], [], [], 0
    for i, (path, leaf) in enumerate(with_path):
        kind = getattr(leaf, "dtype", None) or jnp.result_type(type(leaf))
        if jnp.issubdtype(kind, jnp.complexfloating):
            raise TypeError(f"check_grad: leaf {_keystr(path)} is complex ({kind}); "
                            "only real floating-point leaves can be checked")
        if jnp.issubdtype(kind, jnp.floating) and np.size(leaf) > 0:
            leaf = np.asarray(leaf).astype(dtype)
            paths.append(_keystr(path))
            index.append(i)
            shapes.append(tuple(leaf.shape))
            offsets.append(size)
            size += leaf.size
        leaves.append(leaf)
    if not index:
        raise ValueError("check_grad: the tree has no floating-point leaves to check")
    return _Flat(leaves, treedef, paths, index, shapes, offsets, size)


def _keystr(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


# --------------------------------------------------------------------------- finite differences

def _settings(eps, rtol, atol, allow_float32, value=None):
    dtype = np.dtype(jnp.zeros(()).dtype)
    if dtype != np.float64 and not allow_float32:
        raise RuntimeError(
            "check_grad: float64 is off. Float32 central differences have ~1e-3 relative error, "
            "too coarse to judge a gradient. Enable it at program start (or in conftest.py) with "
            "jax.config.update('jax_enable_x64', True), or pass allow_float32=True for a coarse "
            "check.")
    machine = float(np.finfo(dtype).eps)
    eps = machine ** (1 / 3) if eps is None else float(eps)      # balances rounding and h²
    rtol = (1e-5 if dtype == np.float64 else 2e-2) if rtol is None else float(rtol)
    if atol is None and value is not None:                       # 100 × the rounding floor
        atol = 100 * machine * (1 + abs(value)) / eps
    return dtype, eps, rtol, atol


def _scalar_fn(f, flat, jit):
    def F(vec):
        out = jnp.asarray(f(flat.unravel(vec)))
        if out.shape != ():
            raise ValueError(f"check_grad: f must return a scalar, got shape {out.shape}")
        return out
    return jax.jit(F) if jit else F


def _fd_full(F, vec, eps):
    """Central difference along every coordinate: ``fd[j] = (F(θ+h e_j) − F(θ−h e_j)) / d_j``
    with ``h = eps·max(1, |θ_j|)`` and ``d_j`` the step actually taken after rounding. A host
    loop over one compiled ``F``: no compilation beyond ``F``'s own."""
    out = np.empty(vec.size, np.float64)
    up, down = vec.copy(), vec.copy()
    for j in range(vec.size):
        h = eps * max(1.0, abs(float(vec[j])))
        up[j], down[j] = vec[j] + h, vec[j] - h
        out[j] = (float(F(up)) - float(F(down))) / (float(up[j]) - float(down[j]))
        up[j], down[j] = vec[j], vec[j]
    return out


def numerical_grad(f: Callable, params, *, eps: float | None = None, jit: bool = True,
                   allow_float32: bool = False):
    """The central-difference gradient of scalar ``f`` at ``params``, as a tree like ``params``
    (float64 leaves; other leaves come back as they were). ``2n`` evaluations of ``f``.

    >>> g = numerical_grad(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.arange(3.0)})
    >>> print(g["w"].round(6))                                              # 2w
    [0. 2. 4.]
    """
    dtype, eps, _, _ = _settings(eps, None, None, allow_float32)
    flat = _flatten(params, dtype)
    return flat.unravel(_fd_full(_scalar_fn(f, flat, jit), flat.vector(), eps))


def _directions(flat, seed, k):
    """Yield ``(leaf index or None, unit v)``: ``k`` random directions per float leaf (zero
    outside it), then ``k`` over the whole tree; one at a time, so memory stays flat."""
    rng = np.random.default_rng(seed)
    for li, (s, o) in enumerate(zip(flat.shapes, flat.offsets)):
        n = math.prod(s)
        for _ in range(k):
            v = np.zeros(flat.size)
            v[o:o + n] = rng.standard_normal(n)
            yield li, v / np.linalg.norm(v)
    for _ in range(k):
        v = rng.standard_normal(flat.size)
        yield None, v / np.linalg.norm(v)


def _fd_directional(F, vec, directions, sources, eps):
    """For each unit ``v`` (``h = eps·max(1, rms θ)`` over v's support): the directional
    difference ``(F(θ+hv) − F(θ−hv)) / 2h`` and, per source, ``⟨g, (θ+hv) − (θ−hv)⟩ / 2h``
    (the step actually taken after rounding). Returns ``{leaf: [(fd, {source: gv})]}``."""
    out = {}
    for li, v in directions:
        support = v != 0
        h = eps * max(1.0, float(np.sqrt(np.mean(vec[support] ** 2))))
        up, down = (vec + h * v).astype(vec.dtype), (vec - h * v).astype(vec.dtype)
        fd = (float(F(up)) - float(F(down))) / (2 * h)
        step = up.astype(np.float64) - down.astype(np.float64)
        gv = {name: float(np.dot(g, step)) / (2 * h) for name, g in sources}
        out.setdefault(li, []).append((fd, gv))
    return out


# --------------------------------------------------------------------------- comparison

def _rel(fd, g, rtol, atol):
    """``(|fd − g| / max(|fd|, |g|, atol/rtol), |fd − g|)``; NaN counts as infinitely wrong."""
    fd, g = np.asarray(fd, np.float64), np.asarray(g, np.float64)
    diff = np.abs(fd - g)
    scale = np.maximum(np.maximum(np.abs(fd), np.abs(g)), max(atol / rtol, np.finfo(float).tiny))
    with np.errstate(invalid="ignore"):
        rel = diff / scale
    return np.where(np.isnan(rel), np.inf, rel), diff


def _row(source, leaf, shape, mode, fd, g, rtol, atol, where):
    rel, ab = _rel(fd, g, rtol, atol)
    j = int(np.argmax(rel))
    return LeafCheck(source, leaf, shape, mode, int(rel.size), float(rel[j]), float(ab.flat[j]),
                     where(j), float(np.ravel(fd)[j]), float(np.ravel(g)[j]),
                     bool(rel[j] <= rtol))


def _full_rows(source, flat, fd, g, rtol, atol):
    fd, g = np.asarray(fd), np.asarray(g)
    rows = []
    for path, s, o in zip(flat.paths, flat.shapes, flat.offsets):
        n = math.prod(s)
        where = lambda j, s=s: str(tuple(int(i) for i in np.unravel_index(j, s))) if s else "()"
        rows.append(_row(source, path, s, "full", fd[o:o + n], g[o:o + n], rtol, atol, where))
    return rows


def _directional_rows(source, flat, results, rtol, atol):
    rows = []
    for li, pairs in results.items():
        leaf, shape = ("<global>", (flat.size,)) if li is None else (flat.paths[li],
                                                                      flat.shapes[li])
        fd = np.array([p[0] for p in pairs])
        gv = np.array([p[1][source] for p in pairs])
        rows.append(_row(source, leaf, shape, "directional", fd, gv, rtol, atol,
                         lambda j: f"dir {j}"))
    return rows


def _grad_vector(source, flat, grads):
    """Flatten a user's gradient tree, checking that it matches ``params`` leaf by leaf."""
    gl, gdef = jax.tree.flatten(grads)
    if gdef != flat.treedef:
        raise GradcheckError(f"check_grad: {source} returned a tree of structure {gdef}, "
                             f"but params have structure {flat.treedef}")
    for i, path, s in zip(flat.index, flat.paths, flat.shapes):
        if tuple(jnp.shape(gl[i])) != s:
            raise GradcheckError(f"check_grad: {source} gives leaf {path} shape "
                                 f"{tuple(jnp.shape(gl[i]))}, but the parameter has shape {s}")
    return flat.ravel(gl)


# --------------------------------------------------------------------------- entry points

def check_grad(f: Callable, params, *, grad_fn: Callable | None = None, autodiff: bool = True,
               mode: str = "auto", max_full: int = 2048, num_directions: int = 3,
               eps: float | None = None, rtol: float | None = None, atol: float | None = None,
               seed: int = 0, jit: bool = True, allow_float32: bool = False,
               raise_on_fail: bool = True, grad_name: str = "grad_fn") -> GradcheckReport:
    """Check the gradient of scalar ``f(params)`` against central finite differences.

    **Arguments:**
      - ``f``: ``params -> scalar``, JAX-traceable when ``jit=True`` (the default).
      - ``params``: any pytree; float leaves are checked (cast to float64), others held fixed.
      - ``grad_fn``: optional ``params -> grads`` (same structure) to check, e.g. a closure
        over ``fnn.backprop.grad``, or a dict ``{name: grad_fn}`` of several; ``autodiff=True``
        also checks ``jax.grad(f)``.
      - ``mode``: ``"full"`` (every coordinate), ``"directional"`` (``num_directions`` random
        unit directions per leaf and over the whole tree), or ``"auto"``: full when the tree
        has at most ``max_full`` float entries.
      - ``eps``: relative step, default ``ε_machine^(1/3)`` (6e-6 in float64); coordinate ``j``
        moves by ``eps·max(1, |θ_j|)``, a direction by ``eps·max(1, rms θ)``.
      - ``rtol``/``atol``: pass iff ``|fd − g| ≤ max(rtol·max(|fd|, |g|), atol)``; defaults
        ``1e-5`` and ``100·ε_machine·(1 + |f|)/eps`` (the rounding floor of the difference).
      - ``seed``: for the random directions. ``raise_on_fail``: raise :class:`GradcheckError`
        naming the worst failing leaf (else just return the report). ``grad_name``: how the
        report calls ``grad_fn``.

    **Returns:** a :class:`GradcheckReport` (``str()`` gives the per-leaf table).
    """
    if grad_fn is None and not autodiff:
        raise ValueError("check_grad: nothing to check; pass grad_fn= or leave autodiff=True")
    if mode not in ("auto", "full", "directional"):
        raise ValueError(f"check_grad: mode must be 'auto', 'full' or 'directional', got {mode!r}")
    dtype, eps, rtol, _ = _settings(eps, rtol, 0.0, allow_float32)
    flat = _flatten(params, dtype)
    F = _scalar_fn(f, flat, jit)
    vec = flat.vector()
    value = float(F(vec))
    if not math.isfinite(value):
        raise ValueError(f"check_grad: f(params) = {value} is not finite")
    atol = _settings(eps, rtol, atol, allow_float32, value)[3]

    sources = []
    if autodiff:
        grad = jax.jit(jax.grad(F)) if jit else jax.grad(F)
        sources.append(("jax.grad", np.asarray(grad(vec))))
    fns = grad_fn if isinstance(grad_fn, dict) else {grad_name: grad_fn} if grad_fn else {}
    for name, fn in fns.items():                 # a dict checks several: {name: grad_fn}
        sources.append((name, _grad_vector(name, flat, fn(flat.unravel(vec)))))

    full = mode == "full" or (mode == "auto" and flat.size <= max_full)
    rows = []
    if full:
        fd = _fd_full(F, vec, eps)
        for name, g in sources:
            rows += _full_rows(name, flat, fd, g, rtol, atol)
    else:
        dirs = _directions(flat, seed, num_directions)
        results = _fd_directional(F, vec, dirs, sources, eps)
        for name, _ in sources:
            rows += _directional_rows(name, flat, results, rtol, atol)

    report = GradcheckReport(rows, value=value, eps=eps, rtol=rtol, atol=atol,
                             mode="full" if full else "directional")
    if raise_on_fail:
        raise_if_failed(report, "check_grad")
    return report


def raise_if_failed(report: GradcheckReport, who: str):
    """Raise :class:`GradcheckError` naming the worst failing leaf (per-leaf rows first)."""
    if not report.passed:
        bad = max(report.failures(), key=lambda r: (r.leaf != "<global>", r.max_rel_err))
        raise GradcheckError(
            f"{who}: {bad.source} gradient of leaf {bad.leaf} disagrees with finite "
            f"differences: relative error {bad.max_rel_err:.2e} > rtol {report.rtol:.1e} at "
            f"{bad.worst} (finite difference {bad.fd:.6g}, {bad.source} {bad.grad:.6g})\n{report}",
            report)


from fnn._layer_check import check_layer, check_model  # noqa: E402  (they use check_grad)
