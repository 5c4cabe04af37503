"""The switch for fused (flash) attention in ``MultiHeadAttention``: a JAX configuration option,
``fnn_flash_attention``, so that it is part of ``jax.jit``'s cache key (a function traced under
one mode is traced again under another) and reads its default from ``FNN_FLASH_ATTENTION``."""
from __future__ import annotations

import contextlib
import os

MODES = ("auto", "always", "never")
_NAME = "fnn_flash_attention"


def _register():
    """The option as JAX state (private API, present in jax 0.4.30 … 0.10); ``None`` if it is
    not there, and then a plain variable that jit caches do not see."""
    try:
        from jax._src import config as jax_config
        return jax_config.enum_state(
            _NAME, list(MODES), "auto", "Where fnn's MultiHeadAttention runs the Pallas flash "
            "kernels: auto (TPU), always (TPU, CUDA, interpreted elsewhere), never.", include_in_jit_key=True,
            include_in_trace_context=True)
    except Exception:                                 # noqa: BLE001 - any JAX without it
        return None


_STATE = _register()
_plain = [os.environ.get(_NAME.upper(), "auto")]


def _check(mode):
    if mode not in MODES:
        raise ValueError(f"fnn.kernels.flash_attention_mode: mode must be one of {MODES}, got "
                         f"{mode!r}")
    return mode


def current_mode() -> str:
    """The mode in force (see :func:`flash_attention_mode`)."""
    return _check(_STATE.value if _STATE is not None else _plain[0])


@contextlib.contextmanager
def _set(mode):
    if _STATE is not None:
        with _STATE(mode):
            yield
        return
    previous, _plain[0] = _plain[0], mode
    try:
        yield
    finally:
        _plain[0] = previous


def flash_attention_mode(mode: str | None = None):
    """Read, or set for a ``with`` block, where ``MultiHeadAttention`` (and so every transformer
    block and the GPT) runs attention through the Pallas flash kernels of :mod:`fnn.kernels`.

    ``"auto"`` (the default): the kernel on TPU (Mosaic), chosen per platform when the program
    is lowered (``jax.lax.platform_dependent``), so a program exported or compiled for TPU from
    a CPU host carries it; fnn's jnp forms on CPU, CUDA (the Triton kernel has not yet been
    compiled or run on a GPU) and other platforms. ``"always"``: the kernels on every platform
    (Triton on CUDA; Pallas' interpreter on CPU: slow, for tests). ``"never"``: the jnp forms everywhere. Layers use the jnp forms for what
    the kernels do not do (dropout while training, decoding with a cache, an empty sequence,
    keys too long for a TPU core's VMEM).

    With no argument: the mode in force. With ``mode``: a context manager that sets it inside
    its block. The process-wide default is the environment variable ``FNN_FLASH_ATTENTION`` or
    ``jax.config.update("fnn_flash_attention", mode)``. The mode is part of ``jax.jit``'s cache
    key: a jitted function is traced again when it is called under another mode (example:
    :mod:`fnn.kernels`).
    """
    if mode is None:
        return current_mode()
    return _set(_check(mode))
