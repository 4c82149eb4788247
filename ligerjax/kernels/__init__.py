"""Attention kernels: Pallas (Triton) on GPU, blockwise pure JAX on CPU, and references.

* :func:`flash_attention` — prefill over dense K/V (GQA, causal by absolute position,
  ragged lengths).
* :func:`paged_attention` — decode, one query token per sequence over paged K/V.
* :func:`ragged_paged_attention` — mixed batches: packed new tokens of several sequences
  (chunked prefill and decode) over their pages.
* :func:`write_kv_pages` — scatter new K/V into the pages by slot mapping.

:mod:`ligerjax.kernels.dispatch` picks the implementation per backend; each kernel module
also holds its plain-``jnp`` ``*_reference``. Tuned tiles live in
:mod:`ligerjax.kernels.block_sizes`.
"""

from ligerjax.kernels.flash_attention import flash_attention, flash_attention_reference
from ligerjax.kernels.kv_writer import write_kv_pages, write_kv_pages_reference
from ligerjax.kernels.paged_attention import paged_attention, paged_attention_reference
from ligerjax.kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

__all__ = [
    "flash_attention",
    "flash_attention_reference",
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv_pages",
    "write_kv_pages_reference",
]
