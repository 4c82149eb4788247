"""Per-backend choice of the attention implementation used by ``ligerjax.ops``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_fallback(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    q_positions: jax.Array,  # [B, T] int32
    kv_lengths: jax.Array,  # [B] int32
    *,
    causal: bool,
    sm_scale: float,
) -> jax.Array:  # [B, T, H, D]
    """Dense masked attention in f32 (to be replaced by the blockwise O(S) fallback)."""
    B, T, H, D = q.shape
    K = k.shape[2]
    q_btkgd = q.reshape(B, T, K, H // K, D).astype(jnp.float32)
    logits_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k.astype(jnp.float32)) * sm_scale
    s_idx = jnp.arange(k.shape[1], dtype=jnp.int32)
    mask_bts = s_idx[None, None, :] < kv_lengths[:, None, None]
    if causal:
        mask_bts &= s_idx[None, None, :] <= q_positions[:, :, None]
    mask = mask_bts[:, None, None, :, :]
    logits_bkgts = jnp.where(mask, logits_bkgts, -jnp.inf)
    m = jnp.max(logits_bkgts, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits_bkgts - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o_bkgtd = jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(jnp.float32))
    o_bkgtd = o_bkgtd / jnp.where(denom == 0, 1.0, denom)
    return o_bkgtd.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)
