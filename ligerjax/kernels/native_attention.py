"""Ragged paged attention in C++ for the CPU: an XLA FFI custom call, built on first use.

XLA:CPU runs the pure-JAX fallback as gathers of each sequence's pages followed by many small
batched dots (~10 GFLOP/s). ``native/ragged_paged_attention.cc`` reads the pages in place
through the block table, with AVX2 logits and exponentials and XLA's own intra-op thread
pool: 2.5–11× the fallback per layer, decode bound by memory (docs/BENCHMARKS.md,
"CPU paged attention").
One kernel serves mixed steps (chunked prefill and decode) and plain decode (one query token
per sequence).

Built and loaded by :mod:`ligerjax.kernels.native_library` (the host's C++ compiler, cached,
``LIGERJAX_NATIVE=0`` to turn it off). Where it cannot be built,
:func:`native_unavailable_reason` says why (logged once) and dispatch keeps the fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ligerjax.kernels.native_library import SOURCE_DIR, kernel_unavailable_reason

SOURCE = SOURCE_DIR / "ragged_paged_attention.cc"
SYMBOL = "LigerjaxRaggedPagedAttention"
TARGET = "ligerjax_cpu_ragged_paged_attention"
PAGE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
MAX_PAGE_SIZE = 256  # kMaxPage in the source

__all__ = [
    "native_available",
    "native_paged_attention",
    "native_ragged_paged_attention",
    "native_supported",
    "native_unavailable_reason",
]


def native_unavailable_reason() -> str | None:
    """None once the kernel is built, loaded and registered for the CPU; else why not (logged
    once per process)."""
    return kernel_unavailable_reason(SOURCE, SYMBOL, TARGET, "attention")


def native_available() -> bool:
    """Whether the C++ kernel runs in this process (see the module doc)."""
    return native_unavailable_reason() is None


def native_supported(kv_dtype: jnp.dtype, page_size: int) -> bool:
    """Whether the kernel takes these pages: float32, float16 or bfloat16 K/V, pages of at
    most 256 tokens."""
    return jnp.dtype(kv_dtype) in PAGE_DTYPES and page_size <= MAX_PAGE_SIZE


def native_ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, P, K, D] float32, float16 or bfloat16
    v_pages: jax.Array,  # [N, P, K, D] the same dtype
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32, new tokens included
    cu_q_lens: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float,
) -> jax.Array:  # [T, H, D], q's dtype
    """:func:`ligerjax.kernels.ragged_paged_attention`'s contract, run by the C++ kernel.

    Needs :func:`native_available`; computes in float32 (16-bit pages are converted exactly
    as they are read).
    """
    reason = native_unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"native_ragged_paged_attention: the C++ kernel is unavailable: {reason}"
        )
    if not native_supported(k_pages.dtype, k_pages.shape[1]) or v_pages.dtype != k_pages.dtype:
        raise ValueError(
            f"native_ragged_paged_attention: k_pages {k_pages.dtype}{list(k_pages.shape)}, "
            f"v_pages {v_pages.dtype}; the kernel takes pages of one dtype (float32, float16 or "
            f"bfloat16) and at most {MAX_PAGE_SIZE} tokens"
        )
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )
    as_i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    out = call(
        q.astype(jnp.float32),
        k_pages,
        v_pages,
        as_i32(block_tables),
        as_i32(context_lens),
        as_i32(cu_q_lens),
        sm_scale=np.float32(sm_scale),
    )
    return out.astype(q.dtype)


def native_paged_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, P, K, D] float32, float16 or bfloat16
    v_pages: jax.Array,  # [N, P, K, D] the same dtype
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    *,
    sm_scale: float,
) -> jax.Array:  # [B, H, D]
    """Decode (one query per sequence, at position ``context_lens - 1``) by the C++ kernel."""
    cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return native_ragged_paged_attention(
        q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, sm_scale=sm_scale
    )
