"""The paged KV cache a model attends through in one continuous-batching step.

A step is one flattened row: the new tokens of every scheduled sequence packed end to end,
``[1, T]`` for the model, padded to a bucket. :class:`PagedKVCache` is a pytree that the
model threads through its layers like any cache (``attend(layer, q, k, v, positions)``);
each layer writes its new K/V into the pages by slot mapping with the kernels' writer
(token ``t`` goes to flat slot ``slot_mapping_t[t] = block * P + offset``; padding tokens
carry ``N * P`` and write nothing), then attends with
:func:`ligerjax.ops.ragged_paged_attention`, causal within each sequence and against its
cached prefix. Inside the runner's jitted step the pages are donated, so writes are in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax

from ligerjax import ops
from ligerjax.engine.kv_cache_storage import KVPages
from ligerjax.kernels.dispatch import write_kv_pages


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedKVCache:
    """Per-layer K/V pages plus the metadata of the step's packed tokens."""

    pages: KVPages  # L x [N, P, K, D] for K and for V
    slot_mapping_t: jax.Array  # [T] int32, flat slot of each token; N * P for padding
    block_tables_bm: jax.Array  # [B, M] int32, padded with the null block 0
    context_lens_b: jax.Array  # [B] int32, tokens in the cache after this step's writes
    cu_q_lens_b1: jax.Array  # [B + 1] int32, sequence b's tokens are [cu[b], cu[b+1])

    def attend(
        self,
        layer: int,
        q_bthd: jax.Array,  # [1, T, H, D]
        k_btkd: jax.Array,  # [1, T, K, D]
        v_btkd: jax.Array,  # [1, T, K, D]
        positions_bt: jax.Array,  # [1, T] int32 (implied by the metadata; used by RoPE only)
    ) -> tuple[jax.Array, PagedKVCache]:  # [1, T, H, D]
        """Write this step's K/V of ``layer`` into its pages, then attend over them."""
        if q_bthd.shape[0] != 1:
            raise ValueError(f"PagedKVCache: expects one packed row, got B={q_bthd.shape[0]}")
        k_npkd, v_npkd = write_kv_pages(
            self.pages.k[layer], self.pages.v[layer], k_btkd[0], v_btkd[0], self.slot_mapping_t
        )
        o_thd = ops.ragged_paged_attention(
            q_bthd[0],
            k_npkd,
            v_npkd,
            self.block_tables_bm,
            self.context_lens_b,
            self.cu_q_lens_b1,
        )
        pages = KVPages(
            _replace_at(self.pages.k, layer, k_npkd), _replace_at(self.pages.v, layer, v_npkd)
        )
        return o_thd[None], dataclasses.replace(self, pages=pages)


def _replace_at(arrays: tuple[jax.Array, ...], i: int, x: jax.Array) -> tuple[jax.Array, ...]:
    return (*arrays[:i], x, *arrays[i + 1 :])
