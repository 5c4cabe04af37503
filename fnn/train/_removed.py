"""The keywords ``fit`` took in fnn 0.1 and what replaced them: each gives one ``TypeError``
naming its replacement instead of Python's bare "unexpected keyword argument"."""
from __future__ import annotations

import functools

_ES = "callbacks=[EarlyStopping(patience, min_delta=..., monitor=..., restore_best=...)]"
_BACKUP = ("callbacks=[BackupAndRestore(directory)] (fnn.train.BackupAndRestore: it backs the "
           "run up each epoch and resumes from the backup when there is one)")
_STEP = "step=Step({}=...) (fnn.train.Step)"
_LOOP = "loop=Loop({}=...) (fnn.train.Loop)"
_START = ("train_state=create_train_state(model, optimizer, key, input_shape, params=..., "
          "state=...) (fnn.train.create_train_state)")

RENAMED = {
    "early_stopping": _ES + " (EarlyStopping also takes a fnn.regularizers.early_stopping rule)",
    "min_delta": _ES, "monitor": _ES, "restore_best": _ES,
    "checkpoint_dir": _BACKUP, "resume": _BACKUP,
    "mesh": "distribution=fnn.sharding.Distribution(mesh)",
    "param_sharding": "distribution=fnn.sharding.Distribution(mesh, params=rules)",
    "loss_scale": ("precision=policy (float16 gets dynamic loss scaling), or the combinators: "
                   "fit(mixed_precision(model, policy), loss, loss_scaling(optimizer, "
                   "initial=..., dynamic=...), ...) from fnn.precision"),
    "accuracy": ("metrics=: 'auto' (the default) is accuracy for a classification loss, () is "
                 "none, a function fn goes in as metrics=[fnn.train.mean_metric('accuracy', "
                 "fn), ...], and a list names every metric ('accuracy' included)"),
    "learning_rate": ("nothing: the history's lr is read from the optimizer state (fnn's "
                      "optimizers, constant or scheduled, and optax.inject_hyperparams keep it)"),
    "params": _START, "state": _START,
    **{k: _STEP.format(k) for k in ("grad", "regularizer", "augment", "grad_norm")},
    **{k: _LOOP.format(k) for k in ("shuffle", "drop_last", "progress", "on_nonfinite",
                                    "check_data", "eval_batch_size", "steps_per_epoch",
                                    "chunk")},
}


def refuse_removed(fn):
    """``fn`` that raises one ``TypeError`` listing every removed keyword given and its
    replacement (``inspect.signature`` still shows ``fn``'s own)."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        old = [k for k in kwargs if k in RENAMED]
        if old:
            lines = "; ".join(f"{k}= -> {RENAMED[k]}" for k in old)
            raise TypeError(f"fit: {', '.join(k + '=' for k in old)} "
                            f"{'was' if len(old) == 1 else 'were'} removed in fnn 0.2: {lines}")
        return fn(*args, **kwargs)
    return checked
