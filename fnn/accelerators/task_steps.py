"""The bundled tasks' training steps as compile-only problems: each task's model, loss and the
shapes of one training batch, as ``fnn train NAME`` trains it (no data is loaded but the
character tasks' alphabet, for the vocabulary size).

>>> from fnn.accelerators import task_steps
>>> p = task_steps.problem("digits-mlp")
>>> p.x.shape, p.target.shape, p.depth is None
((32, 64), (32,), True)

``problem(name).step(kind)`` is the step ``(params, state, x, target[, key]) -> ((loss, state),
grads)``: ``"hand"`` the hand-derived backward (:func:`fnn.backprop.value_and_grad`),
``"autodiff"`` ``jax.value_and_grad`` of the loss of ``apply``. ``problem(name, depth=d)`` builds
a GPT task's model at depth ``d`` (for the roofline's depth extrapolation).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fnn import backprop
from fnn.core import Layer

__all__ = ["NAMES", "Problem", "problem", "train_step", "roofline"]

NAMES = ("xor", "digits-mlp", "digits-cnn", "char-lstm", "char-transformer")


class Problem(NamedTuple):
    """A task's ``model``, ``loss``, one batch's input ``x`` and ``target`` (``ShapeDtypeStruct``),
    and ``depth`` (the number of stacked blocks, ``None`` for a model without a ``stack``)."""
    name: str
    model: Layer
    loss: Callable
    x: jax.ShapeDtypeStruct
    target: jax.ShapeDtypeStruct
    depth: int | None

    def step(self, kind: str = "hand"):
        """This problem's training step (see :func:`train_step`)."""
        return train_step(self.model, self.loss, kind)


def train_step(model: Layer, loss, kind: str = "hand"):
    """``f(params, state, x, target, key) -> ((loss, new_state), grads)`` in train mode:
    ``kind="hand"`` by the layers' hand-derived backward, ``"autodiff"`` by ``jax.value_and_grad``
    of ``loss(model.apply(...))``."""
    if kind == "hand":
        vg = backprop.value_and_grad(model, loss)
        return lambda p, s, x, t, key: vg(p, s, x, t, key=key, train=True)
    if kind == "autodiff":
        def f(p, s, x, t, key):
            def value(p):
                y, new_state = model.apply(p, s, x, key=key, train=True)
                return loss(y, t), new_state
            (value, new_state), grads = jax.value_and_grad(value, has_aux=True)(p)
            return (value, new_state), grads
        return f
    raise ValueError(f"train_step: kind must be 'hand' or 'autodiff', got {kind!r}")


def _ids(shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def problem(name: str, *, depth: int | None = None) -> Problem:
    """The training problem of bundled task ``name`` (one of :data:`NAMES`); ``depth`` replaces a
    GPT task's number of blocks. ``ValueError`` for another name."""
    from fnn.tasks import char_lstm, char_transformer, digits_cnn, digits_mlp, xor
    from fnn.models import lm_loss
    f32 = jnp.float32
    if name == "xor":
        return Problem(name, xor.model(), xor.LOSS, jax.ShapeDtypeStruct((32, 2), f32),
                       jax.ShapeDtypeStruct((32, 1), f32), None)
    if name == "digits-mlp":
        return Problem(name, digits_mlp.model(), digits_mlp.LOSS,
                       jax.ShapeDtypeStruct((32, 64), f32), _ids((32,)), None)
    if name == "digits-cnn":
        b = digits_cnn.BATCH
        return Problem(name, digits_cnn.model(), digits_cnn.LOSS,
                       jax.ShapeDtypeStruct((b, 8, 8, 1), f32), _ids((b,)), None)
    vocab = len(set(char_lstm.load_text()))
    if name == "char-lstm":
        cfg = char_lstm.config()
        shape = (cfg["batch"], cfg["window"])
        return Problem(name, char_lstm.model(vocab, cfg["hidden"]), char_lstm.LOSS,
                       _ids(shape), _ids(shape), None)
    if name == "char-transformer":
        from fnn.models import GPT
        c = char_transformer
        d = c.DEPTH if depth is None else depth
        shape = (c.BATCH, c.SEQ)
        return Problem(name, GPT(vocab, c.D, c.HEADS, d, c.MLP, c.SEQ), lm_loss, _ids(shape),
                       _ids(shape), d)
    raise ValueError(f"task_steps.problem: unknown task {name!r}; known: {', '.join(NAMES)}")


def roofline(name: str, chip="v5e", kind: str = "hand", *, target=None, depth=None):
    """The :class:`fnn.accelerators.roofline.Roofline` of task ``name``'s training step (``kind``
    ``"hand"`` or ``"autodiff"``, float32, one training batch) on ``chip``, compiled for
    ``target`` (default the chip; ``"cpu"``: the host compiler's counts). A GPT task's FLOPs
    and bytes come from depth 1 and 2 extrapolated to its depth (or ``depth``)."""
    from fnn.accelerators.roofline import step_roofline
    depth = problem(name).depth if depth is None else depth

    def build(d):
        p = problem(name, depth=d)
        params, state, _ = jax.eval_shape(lambda k: p.model.init(k, p.x.shape),
                                          jax.random.PRNGKey(0))
        return p.step(kind), (params, state, p.x, p.target, jax.random.PRNGKey(0))
    with jax.enable_x64(False):                         # float32, as on the chip
        return step_roofline(build, chip, depth=depth, dtype="float32", target=target)
