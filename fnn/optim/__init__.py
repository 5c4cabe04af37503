"""Hand-written optimizers, optax-shaped: ``(init, update)`` pairs of pure functions over pytrees.

::

    import fnn.optim as optim
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adamw(optim.schedules.warmup_cosine(0.0, 1e-3, 100, 1000),
                                  weight_decay=1e-2, mask=optim.not_named("b", "scale")))
    opt_state = opt.init(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optim.apply_updates(params, updates)

fnn transforms and optax transforms chain with each other in either direction.
"""
from fnn.optim import schedules
from fnn.optim.base import (AddDecayedWeightsState, EmptyState, GradientTransformation,
                            ScaleByScheduleState, add_decayed_weights, apply_updates, chain,
                            check_structure, identity, not_named, resolve_mask, safe_increment,
                            scale, scale_by_schedule)
from fnn.optim.clipping import (GradNorms, clip_by_global_norm, clip_by_leaf_norm, clip_by_value,
                                global_norm, grad_norms, leaf_norms)
from fnn.optim.rates import (LearningRateState, ScheduledLearningRateState, check_rate,
                             learning_rate, scale_by_learning_rate, set_learning_rate)
from fnn.optim.optimizers import adagrad, adam, adamax, adamw, lion, nadam, rmsprop, sgd
from fnn.optim.transforms import (ScaleByAdamState, ScaleByLionState, ScaleByRmsState,
                                  ScaleByRssState, ScaleByStddevState, TraceState, scale_by_adam,
                                  scale_by_adamax, scale_by_lion, scale_by_rms, scale_by_rss,
                                  scale_by_stddev, trace)

__all__ = [
    # optimizers
    "sgd", "adagrad", "rmsprop", "adam", "adamw", "adamax", "nadam", "lion",
    # protocol and composition
    "GradientTransformation", "EmptyState", "identity", "chain", "apply_updates",
    "safe_increment", "check_structure",
    # pieces
    "trace", "scale_by_rss", "scale_by_rms", "scale_by_stddev", "scale_by_adam",
    "scale_by_adamax", "scale_by_lion", "scale", "scale_by_schedule", "scale_by_learning_rate",
    "add_decayed_weights", "not_named", "resolve_mask",
    # clipping and monitoring
    "clip_by_global_norm", "clip_by_leaf_norm", "clip_by_value", "global_norm", "leaf_norms",
    "grad_norms", "GradNorms",
    # states
    "TraceState", "ScaleByRssState", "ScaleByRmsState", "ScaleByStddevState",
    "ScaleByAdamState", "ScaleByLionState", "ScaleByScheduleState", "AddDecayedWeightsState",
    # the learning rate as state
    "learning_rate", "set_learning_rate", "check_rate", "LearningRateState",
    "ScheduledLearningRateState",
    # schedules
    "schedules",
]
