"""KV caches the model writes into and attends over; pytrees passed in and returned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp

from ligerjax import ops


class KVCache(Protocol):
    """What an attention layer needs of a cache: write this step's K/V, then attend."""

    def attend(
        self,
        layer: int,
        q_bthd: jax.Array,  # [B, T, H, D]
        k_btkd: jax.Array,  # [B, T, K, D]
        v_btkd: jax.Array,  # [B, T, K, D]
        positions_bt: jax.Array,  # [B, T] int32
    ) -> tuple[jax.Array, KVCache]: ...


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DenseKVCache:
    """One contiguous ``[L, B, S, K, D]`` slab per K and V; token at position p sits in slot p.

    Padding tokens carry a position ``>= S``: their writes are dropped and no query sees them.
    """

    k_lbskd: jax.Array  # [L, B, S, K, D]
    v_lbskd: jax.Array  # [L, B, S, K, D]

    @classmethod
    def zeros(
        cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype
    ) -> DenseKVCache:
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k_lbskd.shape[2]

    def attend(self, layer, q_bthd, k_btkd, v_btkd, positions_bt):
        B = q_bthd.shape[0]
        b_idx = jnp.arange(B)[:, None]
        k_l = (
            self.k_lbskd[layer]
            .at[b_idx, positions_bt]
            .set(k_btkd.astype(self.k_lbskd.dtype), mode="drop")
        )
        v_l = (
            self.v_lbskd[layer]
            .at[b_idx, positions_bt]
            .set(v_btkd.astype(self.v_lbskd.dtype), mode="drop")
        )
        o_bthd = ops.attention(q_bthd, k_l, v_l, causal=True, q_positions=positions_bt)
        cache = DenseKVCache(self.k_lbskd.at[layer].set(k_l), self.v_lbskd.at[layer].set(v_l))
        return o_bthd, cache


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class NoCache:
    """Attend only within this step's tokens (a whole sequence at once); nothing is kept."""

    def attend(self, layer, q_bthd, k_btkd, v_btkd, positions_bt):
        o_bthd = ops.attention(q_bthd, k_btkd, v_btkd, causal=True, q_positions=positions_bt)
        return o_bthd, self
