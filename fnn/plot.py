"""Plots for training (matplotlib, an optional extra; the Agg backend, PNG files).

Every function draws one figure, saves it to ``path`` (parent folders created), closes it and
returns ``path``::

    plot.training_curves(result.history, "out/curves.png", best_epoch=result.best_epoch)
    plot.lr_finder(train.lr_find(...), "out/lr_find.png")
    plot.decision_boundary(lambda x: model.apply(params, state, x)[0], x, y, "out/boundary.png")
    plot.activations(["relu", "tanh", "gelu"], "out/activations.png")
    plot.histograms(params, "out/weights.png", title="weights")
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np

__all__ = ["training_curves", "lr_finder", "decision_boundary", "activations", "histograms",
           "save"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("fnn.plot needs matplotlib: pip install 'fnn[examples]'") from e
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, *, dpi: int = 100) -> str:
    """Write the matplotlib figure ``fig`` to ``path`` (its folder made if missing; cropped to
    its contents) and close it; returns ``path``. Every figure fnn and its examples draw goes
    out through here."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


_save = save


_YLABELS = {"loss": "loss (mean per example)", "accuracy": "accuracy (fraction correct)",
            "learning rate": "learning rate", "gradient norm": "global gradient L2 norm"}


def _curve_panels(history):
    """``(title, keys)`` of the panels worth drawing; a constant learning rate gets none."""
    panels = [("loss", ["loss", "val_loss"]), ("accuracy", ["accuracy", "val_accuracy"]),
              ("learning rate", ["lr"]), ("gradient norm", ["grad_norm"])]
    has = lambda k: k in history and any(np.isfinite(v) for v in np.asarray(history[k], float))
    panels = [(t, [k for k in ks if has(k)]) for t, ks in panels]
    lr = np.asarray(history.get("lr", []), float)
    constant = lr.size > 0 and np.all(lr[np.isfinite(lr)] == lr[np.isfinite(lr)][:1])
    return [(t, ks) for t, ks in panels if ks and not (t == "learning rate" and constant)]


def training_curves(history: dict, path, *, best_epoch: int | None = None) -> str:
    """Loss (train and validation), accuracy, learning rate and gradient norm per epoch.

    ``history``: the per-epoch lists of :func:`fnn.train.fit` (``epoch``, ``loss``, optional
    ``val_loss``, ``accuracy``, ``val_accuracy``, ``lr``, ``grad_norm``). Each panel has a
    labelled y-axis; a learning rate that never changes gets no panel (its value is in the
    loss panel's title). ``best_epoch`` (``FitResult.best_epoch``, the epoch whose weights
    early stopping restored) is marked by a dashed vertical line in every panel.
    """
    plt = _pyplot()
    panels = _curve_panels(history)
    if "epoch" not in history or not panels:
        raise ValueError(f"plot.training_curves: expected a fit history with 'epoch' and "
                         f"'loss', got keys {sorted(history)}")
    epochs = history["epoch"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot(epochs, history[k], marker="." if len(epochs) < 30 else None, label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel(_YLABELS[title])
        ax.set_title(title)
        if title in ("loss", "gradient norm") and all(
                v > 0 for k in keys for v in history[k] if np.isfinite(v)):
            ax.set_yscale("log")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1,
                       label=f"best epoch {best_epoch} (restored)")
        if len(keys) > 1 or best_epoch is not None:
            ax.legend(fontsize=8)
    lr = history.get("lr")
    if lr and "learning rate" not in [t for t, _ in panels] and np.isfinite(lr[0]):
        axes[0][0].set_title(f"loss (constant learning rate {lr[0]:.3g})")
    fig.tight_layout()
    return _save(fig, path)


def lr_finder(result, path) -> str:
    """Loss against learning rate (log axis) from :func:`fnn.train.lr_find`, with the
    suggested rate marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(result.lrs, result.losses, label="loss")
    ax.axvline(result.suggestion, color="tab:red", linestyle="--",
               label=f"suggestion {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.legend()
    return _save(fig, path)


def decision_boundary(predict, x, y, path, *, resolution: int = 200, margin: float = 0.5,
                      title: str | None = None, xlabel: str = "$x_1$", ylabel: str = "$x_2$",
                      class_names=None) -> str:
    """2-D decision regions of ``predict`` with the points ``x: [n, 2]`` coloured by ``y``.

    ``predict(grid: [m, 2]) -> [m, classes]`` scores (the arg-max class is shaded) or
    ``[m]``/``[m, 1]`` (a binary score, e.g. ``P(class 1)``; shaded by value with a colour
    bar, the 0.5 level drawn). Axes are labelled ``xlabel``/``ylabel`` (the two input
    features); a legend names each class of the points (``class_names[k]``, default
    ``"class k"``).
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"plot.decision_boundary: expected points of shape (n, 2), "
                         f"got {x.shape}")
    lo, hi = x.min(axis=0) - margin, x.max(axis=0) + margin
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], resolution),
                         np.linspace(lo[1], hi[1], resolution))
    grid = np.stack([g0.ravel(), g1.ravel()], axis=1).astype(x.dtype)   # (res², 2)
    z = np.asarray(predict(grid))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    labels = y.reshape(len(y), -1)[:, 0]
    if z.ndim == 2 and z.shape[1] > 1:                  # class k gets colour k of tab10
        k = z.shape[1]
        cmap = ListedColormap(plt.get_cmap("tab10").colors[:k])
        ax.contourf(g0, g1, z.argmax(axis=1).reshape(g0.shape), alpha=0.45, cmap=cmap,
                    levels=np.arange(k + 1) - 0.5)
        colour = lambda c: cmap(int(c))
    else:
        z = z.reshape(g0.shape)
        filled = ax.contourf(g0, g1, z, levels=20, cmap="RdBu_r", alpha=0.6)
        ax.contour(g0, g1, z, levels=[0.5], colors="k", linewidths=1)
        fig.colorbar(filled, ax=ax, label="score (0.5 level drawn)")
        colour = lambda c: plt.get_cmap("RdBu_r")(float(c >= 0.5))
    for c in np.unique(labels):                              # one scatter per class: a legend
        pick = labels == c
        name = class_names[int(c)] if class_names is not None else f"class {c:g}"
        ax.scatter(x[pick, 0], x[pick, 1], color=colour(c), edgecolors="k", s=25, label=name)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "decision boundary")
    return _save(fig, path)


def activations(fns=("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "swish",
                     "softplus"), path="activations.png", *, lo: float = -4.0,
                hi: float = 4.0) -> str:
    """Each activation ``f`` and its hand-derived derivative ``f.grad`` on ``[lo, hi]``.

    ``fns``: names in :mod:`fnn.activations` or the functions themselves.
    """
    from fnn import activations as acts
    plt = _pyplot()
    fns = [getattr(acts, f) if isinstance(f, str) else f for f in fns]
    cols = min(4, len(fns))
    rows = math.ceil(len(fns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    z = np.linspace(lo, hi, 401)
    for ax, f in zip(axes.ravel(), fns):
        ax.plot(z, np.asarray(f(jax.numpy.asarray(z))), label="f(z)")
        if hasattr(f, "grad"):
            ax.plot(z, np.asarray(f.grad(jax.numpy.asarray(z))), "--", label="f'(z)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(getattr(f, "__name__", "f"))
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(fns):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def histograms(tree, path, *, title: str = "weights", bins: int = 40) -> str:
    """One histogram per array of ``tree`` (params or gradients), titled by its key path,
    with its mean absolute value: a quick look for dead, exploding or vanishing layers."""
    plt = _pyplot()
    flat = [(_path_name(p), np.asarray(a, np.float64).ravel())
            for p, a in jax.tree_util.tree_flatten_with_path(tree)[0] if np.size(a) > 1]
    if not flat:
        raise ValueError(f"plot.histograms: {title} has no array with more than one entry")
    cols = min(4, len(flat))
    rows = math.ceil(len(flat) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, v) in zip(axes.ravel(), flat):
        ax.hist(v[np.isfinite(v)], bins=bins, color="tab:blue", alpha=0.8)
        ax.set_title(f"{name}\nmean|x| {np.mean(np.abs(v)):.2e}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(flat):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _path_name(path) -> str:
    """``('0', 'w')`` key path as ``0/w``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path) or "value"
