"""The paged KV cache a model attends through in one continuous-batching step.

A step is one flattened row: the new tokens of every scheduled sequence packed end to end,
``[1, T]`` for the model, padded to a bucket. :class:`PagedKVCache` is a pytree that the
model threads through its layers like any cache (``attend(layer, q, k, v, positions)``);
each layer writes its new K/V into the pages by slot mapping (token ``t`` goes to flat slot
``slot_mapping_t[t] = block * P + offset``; padding tokens carry ``N * P`` and are dropped),
then attends with :func:`ligerjax.ops.ragged_paged_attention`, causal within each sequence
and against its cached prefix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ligerjax import ops
from ligerjax.engine.kv_cache_storage import KVPages

# KV tokens a fallback attention step reads per query token (in pages of P: a multiple of P).
_FALLBACK_CHUNK_TOKENS = 128


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
        k_npkd = write_pages(self.pages.k[layer], k_btkd[0], self.slot_mapping_t)
        v_npkd = write_pages(self.pages.v[layer], v_btkd[0], self.slot_mapping_t)
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


def write_pages(
    pages_npkd: jax.Array,  # [N, P, K, D]
    new_tkd: jax.Array,  # [T, K, D]
    slot_mapping_t: jax.Array,  # [T] int32, flat slots; out of range (N * P) drops the token
) -> jax.Array:  # [N, P, K, D]
    """Scatter new K (or V) into their slots; in place when the pages are donated."""
    N, P, K, D = pages_npkd.shape
    flat_skd = pages_npkd.reshape(N * P, K, D)
    flat_skd = flat_skd.at[slot_mapping_t].set(new_tkd.astype(pages_npkd.dtype), mode="drop")
    return flat_skd.reshape(N, P, K, D)


def _replace_at(arrays: tuple[jax.Array, ...], i: int, x: jax.Array) -> tuple[jax.Array, ...]:
    return (*arrays[:i], x, *arrays[i + 1 :])


def ragged_paged_attention_fallback(
    q_thd: jax.Array,  # [T, H, D]
    k_pages_npkd: jax.Array,  # [N, P, K, D]
    v_pages_npkd: jax.Array,  # [N, P, K, D]
    block_tables_bm: jax.Array,  # [B, M] int32
    context_lens_b: jax.Array,  # [B] int32
    cu_q_lens_b1: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float,
) -> jax.Array:  # [T, H, D]
    """Pure-JAX ragged paged attention (the contract of ``ops.ragged_paged_attention``).

    Each query token gathers its own sequence's pages, a chunk of ``_FALLBACK_CHUNK_TOKENS``
    keys at a time, with an online softmax: memory O(T · chunk), and a loop whose trip count
    is the longest context in the batch, so shapes stay fixed while contexts grow.
    """
    T, H, D = q_thd.shape
    _, P, K, _ = k_pages_npkd.shape
    B, M = block_tables_bm.shape
    G = H // K
    pages_per_chunk = max(1, min(M, _FALLBACK_CHUNK_TOKENS // P))
    M_pad = -(-M // pages_per_chunk) * pages_per_chunk
    tables_bm = jnp.pad(block_tables_bm, ((0, 0), (0, M_pad - M)))
    # Which sequence each token belongs to, and how many keys it sees (its position + 1).
    t_idx = jnp.arange(T, dtype=jnp.int32)
    seq_t = jnp.searchsorted(cu_q_lens_b1[1:], t_idx, side="right").astype(jnp.int32)
    valid_t = seq_t < B
    seq_t = jnp.minimum(seq_t, B - 1)
    kv_len_t = context_lens_b[seq_t] - cu_q_lens_b1[seq_t + 1] + t_idx + 1
    kv_len_t = jnp.where(valid_t, kv_len_t, 0)
    tables_tm = tables_bm[seq_t]
    q_tkgd = q_thd.reshape(T, K, G, D).astype(jnp.float32) * sm_scale
    C = pages_per_chunk * P

    def body(i, carry):
        m_tkg, l_tkg, acc_tkgd = carry
        pages_tc = jax.lax.dynamic_slice_in_dim(tables_tm, i * pages_per_chunk, pages_per_chunk, 1)
        k_tskd = k_pages_npkd[pages_tc].reshape(T, C, K, D).astype(jnp.float32)
        v_tskd = v_pages_npkd[pages_tc].reshape(T, C, K, D).astype(jnp.float32)
        s_idx = i * C + jnp.arange(C, dtype=jnp.int32)
        mask_t1s = (s_idx[None, :] < kv_len_t[:, None])[:, None, None, :]
        logits_tkgs = jnp.einsum("tkgd,tskd->tkgs", q_tkgd, k_tskd)
        logits_tkgs = jnp.where(mask_t1s, logits_tkgs, -jnp.inf)
        m_new = jnp.maximum(m_tkg, jnp.max(logits_tkgs, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p_tkgs = jnp.where(mask_t1s, jnp.exp(logits_tkgs - m_safe[..., None]), 0.0)
        alpha_tkg = jnp.where(jnp.isfinite(m_tkg), jnp.exp(m_tkg - m_safe), 0.0)
        l_tkg = alpha_tkg * l_tkg + jnp.sum(p_tkgs, axis=-1)
        acc_tkgd = alpha_tkg[..., None] * acc_tkgd + jnp.einsum("tkgs,tskd->tkgd", p_tkgs, v_tskd)
        return m_new, l_tkg, acc_tkgd

    init = (
        jnp.full((T, K, G), -jnp.inf, jnp.float32),
        jnp.zeros((T, K, G), jnp.float32),
        jnp.zeros((T, K, G, D), jnp.float32),
    )
    num_chunks = (jnp.max(kv_len_t) + C - 1) // C
    _, l_tkg, acc_tkgd = jax.lax.fori_loop(0, num_chunks, body, init)
    o_tkgd = acc_tkgd / jnp.where(l_tkg == 0, 1.0, l_tkg)[..., None]
    return o_tkgd.reshape(T, H, D).astype(q_thd.dtype)


def ragged_paged_attention_reference(
    q_thd: jax.Array,  # [T, H, D]
    k_pages_npkd: jax.Array,  # [N, P, K, D]
    v_pages_npkd: jax.Array,  # [N, P, K, D]
    block_tables_bm: jax.Array,  # [B, M] int32
    context_lens_b: jax.Array,  # [B] int32
    cu_q_lens_b1: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float,
) -> jax.Array:  # [T, H, D]
    """Plain per-sequence dense attention (host loop over sequences), for tests."""
    T, H, D = q_thd.shape
    K = k_pages_npkd.shape[2]
    out = jnp.zeros((T, H, D), jnp.float32)
    for b in range(block_tables_bm.shape[0]):
        start, stop = int(cu_q_lens_b1[b]), int(cu_q_lens_b1[b + 1])
        n, S = stop - start, int(context_lens_b[b])
        if n == 0:
            continue
        k_skd = k_pages_npkd[block_tables_bm[b]].reshape(-1, K, D)[:S].astype(jnp.float32)
        v_skd = v_pages_npkd[block_tables_bm[b]].reshape(-1, K, D)[:S].astype(jnp.float32)
        q_nhd = q_thd[start:stop].astype(jnp.float32)
        k_shd = jnp.repeat(k_skd, H // K, axis=1)
        v_shd = jnp.repeat(v_skd, H // K, axis=1)
        logits_hns = jnp.einsum("nhd,shd->hns", q_nhd, k_shd) * sm_scale
        pos_n = S - n + jnp.arange(n)
        mask_ns = jnp.arange(S)[None, :] <= pos_n[:, None]
        probs_hns = jax.nn.softmax(jnp.where(mask_ns, logits_hns, -jnp.inf), axis=-1)
        out = out.at[start:stop].set(jnp.einsum("hns,shd->nhd", probs_hns, v_shd))
    return out.astype(q_thd.dtype)
