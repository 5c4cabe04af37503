"""The options of :func:`fnn.train.fit` that most runs leave as they are, in two small frozen
objects: :class:`Step` (what one train step computes) and :class:`Loop` (how the epochs run).

::

    fit(model, loss, opt, (x, y), epochs=20, batch_size=32, key=key,
        step=Step(grad="manual", regularizer=regularizers.l2(1e-4), grad_norm=True),
        loop=Loop(shuffle=False, progress=False))

Both are hashable values checked when built (a typo is a ``TypeError`` naming the field, a bad
value a ``ValueError``), so one object can be kept and passed to many runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["Step", "Loop"]

_PROGRESS = ("auto", "lines", True, False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step:
    """What one train step computes, besides the model, loss and optimizer.

    - ``grad``: ``"autodiff"`` (``jax.value_and_grad``), ``"manual"`` (the layers'
      hand-derived backward rules) or a gradient function shaped like
      :func:`fnn.backprop.value_and_grad`'s result (see :func:`fnn.train.make_step`).
    - ``regularizer``: a :class:`fnn.regularizers.Regularizer` added to the objective (the
      history shows the data loss).
    - ``augment``: ``fn(key, x, target) -> (x, target)``, jittable, applied to each training
      batch inside the step with ``key = fold_in(train_state.key, train_state.step)``.
    - ``grad_norm``: the mean gradient norm per epoch in the history (one more pass over the
      gradients per step). A non-finite gradient stops training either way.
    """

    grad: str | Callable = "autodiff"
    regularizer: Any = None
    augment: Callable | None = None
    grad_norm: bool = False

    def __post_init__(self):
        if not (self.grad in ("autodiff", "manual") or callable(self.grad)):
            raise ValueError(f"Step: grad must be 'autodiff', 'manual' or a function (params, "
                             f"state, x, target, *, key, train, **kw) -> ((loss, state), "
                             f"grads), got {self.grad!r}")
        if self.augment is not None and not callable(self.augment):
            raise TypeError(f"Step: augment must be a function (key, x, target) -> (x, target), "
                            f"got {type(self.augment).__name__}")
        if not isinstance(self.grad_norm, bool):
            raise TypeError(f"Step: grad_norm must be True or False, got {self.grad_norm!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loop:
    """How ``fit`` runs its epochs.

    - ``shuffle``: reshuffle in-memory data each epoch (with a key split from the train key).
    - ``drop_last``: leave out the partial last batch of in-memory data (else it runs as a
      real smaller batch).
    - ``progress``, on stderr: ``"auto"`` (a tqdm bar when stderr is a terminal, else one
      plain line per epoch), ``True`` (the bar), ``"lines"`` (one line per epoch, every
      epoch), ``False`` (nothing).
    - ``on_nonfinite``: ``"stop"`` (warn and return the last finite state) or ``"raise"``
      (``FloatingPointError``); the message says whether that batch's inputs were finite.
    - ``check_data``: before training (each streamed batch as it comes, on the host), refuse
      non-finite inputs, integer labels outside the model's classes and token ids outside an
      ``Embedding``'s vocabulary (:mod:`fnn.train.data_checks`).
    - ``eval_batch_size``: batch size of in-memory validation.
    - ``steps_per_epoch``: at most this many streamed batches per epoch (``None``: the whole
      iterable).
    - ``chunk``: streamed steps per compiled call.
    """

    shuffle: bool = True
    drop_last: bool = False
    progress: Any = "auto"
    on_nonfinite: str = "stop"
    check_data: bool = True
    eval_batch_size: int = 512
    steps_per_epoch: int | None = None
    chunk: int = 32

    def __post_init__(self):
        if self.on_nonfinite not in ("stop", "raise"):
            raise ValueError(f"Loop: on_nonfinite must be 'stop' or 'raise', got "
                             f"{self.on_nonfinite!r}")
        if self.progress not in _PROGRESS or (self.progress in (0, 1) and
                                              not isinstance(self.progress, bool)):
            raise ValueError(f"Loop: progress must be 'auto', 'lines', True or False, got "
                             f"{self.progress!r}")
        for name in ("eval_batch_size", "chunk") + (("steps_per_epoch",)
                                                   if self.steps_per_epoch is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Loop: {name} must be a positive int, got {v!r}")
        for name in ("shuffle", "drop_last", "check_data"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Loop: {name} must be True or False, got "
                                f"{getattr(self, name)!r}")
