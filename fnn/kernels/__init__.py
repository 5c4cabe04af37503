"""Pallas kernels: flash attention with a hand-derived backward, for TPU (Mosaic) and GPU
(Triton), and the switch that decides where ``MultiHeadAttention`` uses them.

:func:`flash_attention_fwd` → ``(out, (m, l))`` and :func:`flash_attention_bwd` are the residual
pair; :func:`flash_attention` wires them into ``jax.custom_vjp``. :func:`flash_attention_mode`
reads or sets where layers use them (``"auto"``: on TPU, chosen when lowering; on CUDA only with
``"always"`` until the Triton kernel has run on a GPU).

>>> flash_attention_mode()
'auto'
>>> with flash_attention_mode("never"):
...     flash_attention_mode()
'never'
"""
from fnn.kernels._flash import (flash_attention, flash_attention_bwd, flash_attention_fwd,
                                vmem_bytes)
from fnn.kernels._switch import flash_attention_mode

__all__ = ["flash_attention", "flash_attention_fwd", "flash_attention_bwd", "vmem_bytes",
           "flash_attention_mode"]
