"""The operators that the compiler recognises by name in a traced program.

Models call :func:`attention` instead of writing softmax(QKᵀ)V by hand, so that the
``attention`` pass finds every attention as one ``pjit`` equation named
``ligerjax_attention`` and can route it to the right kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ATTENTION_NAME = "ligerjax_attention"


def attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    *,
    causal: bool = True,
    q_positions: jax.Array | None = None,  # [B, T] int32
    kv_lengths: jax.Array | None = None,  # [B] int32
    sm_scale: float | None = None,
) -> jax.Array:  # [B, T, H, D]
    """Multi-head attention with GQA, absolute-position causal masking and ragged lengths.

    A query at position ``p`` sees keys at positions ``<= p`` (key ``s`` sits at position
    ``s``); ``q_positions`` defaults to ``S - T + arange(T)`` (the queries are the last ``T``
    tokens). Keys at or past ``kv_lengths[b]`` are ignored. Query rows that see no key give 0.
    """
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k {k.shape} / v {v.shape} do not fit q {q.shape}")
    if H % K:
        raise ValueError(f"attention: query heads H={H} not a multiple of kv heads K={K}")
    if q_positions is None:
        q_positions = jnp.broadcast_to(S - T + jnp.arange(T, dtype=jnp.int32), (B, T))
    if kv_lengths is None:
        kv_lengths = jnp.full((B,), S, dtype=jnp.int32)
    scale = float(sm_scale) if sm_scale is not None else D**-0.5
    return _attention_call(q, k, v, q_positions, kv_lengths, causal=causal, sm_scale=scale)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def ligerjax_attention(q, k, v, q_positions, kv_lengths, *, causal, sm_scale):
    """The traced attention call: its jaxpr equation is a ``pjit`` named after this function."""
    from ligerjax.kernels.dispatch import attention_fallback

    return attention_fallback(q, k, v, q_positions, kv_lengths, causal=causal, sm_scale=sm_scale)


_attention_call = ligerjax_attention
