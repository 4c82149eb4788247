"""Pure-JAX blockwise attention: what runs where there is no Pallas backend (the CPU).

The same online softmax as the Pallas kernels, written as XLA loops: an outer loop over query
tiles and an inner loop over key tiles, so that only one ``[block_q, block_k]`` tile of logits
per head is alive at a time (O(S) memory, not O(S²); ``ligerjax bench attention`` checks
``memory_analysis()``). Under a causal mask the inner loop stops at the last key the tile's
queries can see, and the tiles that every query sees whole skip the mask. All arithmetic is in
float32; query rows that see no key come out 0.

* :func:`blockwise_attention` — dense ``[B, S, K, D]`` keys and values (prefill).
* :func:`blockwise_paged_attention` — one query per sequence, keys gathered from the pages a
  few at a time through the block table (decode), in items packed across sequences.
* :func:`blockwise_ragged_paged_attention` — packed query tokens of several sequences
  (chunked prefill and decode in one call), each query tile against its sequence's pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ligerjax.kernels.block_sizes import FALLBACK, next_power_of_two
from ligerjax.kernels.online_softmax import M_INIT, Carry


def _cdiv(a, b):
    return (a + b - 1) // b


def _online_softmax_step(
    carry: Carry,
    logits: jax.Array,  # [..., R, C] f32
    v_ckd: jax.Array,  # values of the tile, contracted by `pv`
    mask: jax.Array | None,  # broadcastable to logits
    pv: str,
) -> Carry:
    m, l, acc = carry  # [..., R], [..., R], [..., R, D]
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum(pv, p, v_ckd)
    return m_new, l, acc


def _init_carry(shape_r: tuple[int, ...], head_dim: int) -> Carry:
    return (
        jnp.full(shape_r, M_INIT, jnp.float32),
        jnp.zeros(shape_r, jnp.float32),
        jnp.zeros((*shape_r, head_dim), jnp.float32),
    )


def _finish(l: jax.Array, acc: jax.Array) -> jax.Array:
    """acc / l, with 0 for rows that saw no key (l == 0)."""
    return acc / jnp.where(l == 0, 1.0, l)[..., None]


def blockwise_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    q_positions: jax.Array,  # [B, T] int32
    kv_lengths: jax.Array,  # [B] int32
    *,
    causal: bool,
    sm_scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:  # [B, T, H, D]
    """Attention over dense K/V in query and key tiles (see the module doc)."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    bq = min(block_q or FALLBACK.block_q, T)
    bk = min(block_k or FALLBACK.block_k, S)
    nq, nk = _cdiv(T, bq), _cdiv(S, bk)
    if T == 0 or H == 0 or D == 0:
        return jnp.zeros_like(q)
    if S == 0:
        return jnp.zeros_like(q)
    q_btkgd = jnp.pad(q, ((0, 0), (0, nq * bq - T), (0, 0), (0, 0))).reshape(B, -1, K, G, D)
    pos_bt = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, nq * bq - T)), constant_values=-1)
    k_bskd = jnp.pad(k, ((0, 0), (0, nk * bk - S), (0, 0), (0, 0)))
    v_bskd = jnp.pad(v, ((0, 0), (0, nk * bk - S), (0, 0), (0, 0)))
    len_b = jnp.clip(kv_lengths.astype(jnp.int32), 0, S)
    max_len, min_len = jnp.max(len_b), jnp.min(len_b)

    def q_tile(i, out_btkgd):
        q_bqkgd = lax.dynamic_slice_in_dim(q_btkgd, i * bq, bq, axis=1).astype(jnp.float32)
        q_bqkgd = q_bqkgd * sm_scale
        pos_bq = lax.dynamic_slice_in_dim(pos_bt, i * bq, bq, axis=1)

        def key_tile(masked: bool):
            def body(j, carry):
                k_bckd = lax.dynamic_slice_in_dim(k_bskd, j * bk, bk, axis=1)
                v_bckd = lax.dynamic_slice_in_dim(v_bskd, j * bk, bk, axis=1)
                logits_bkgqc = jnp.einsum("bqkgd,bckd->bkgqc", q_bqkgd, k_bckd.astype(jnp.float32))
                mask = None
                if masked:
                    s_c = j * bk + jnp.arange(bk, dtype=jnp.int32)
                    mask_bqc = s_c[None, None, :] < len_b[:, None, None]
                    if causal:
                        mask_bqc &= s_c[None, None, :] <= pos_bq[:, :, None]
                    mask = mask_bqc[:, None, None]
                return _online_softmax_step(
                    carry, logits_bkgqc, v_bckd.astype(jnp.float32), mask, "bkgqc,bckd->bkgqd"
                )

            return body

        if causal:
            hi = jnp.minimum(_cdiv(jnp.max(pos_bq) + 1, bk), _cdiv(max_len, bk))
            full = jnp.minimum(jnp.maximum(jnp.min(pos_bq) + 1, 0), min_len) // bk
        else:
            hi = _cdiv(max_len, bk)
            full = min_len // bk
        hi = jnp.maximum(hi, 0)
        full = jnp.clip(full, 0, hi)
        carry = _init_carry((B, K, G, bq), D)
        carry = lax.fori_loop(0, full, key_tile(masked=False), carry)
        _, l, acc = lax.fori_loop(full, hi, key_tile(masked=True), carry)
        o_bqkgd = _finish(l, acc).transpose(0, 3, 1, 2, 4).astype(q.dtype)
        return lax.dynamic_update_slice_in_dim(out_btkgd, o_bqkgd, i * bq, axis=1)

    out = lax.fori_loop(0, nq, q_tile, jnp.zeros_like(q_btkgd))
    return out[:, :T].reshape(B, T, H, D)


def blockwise_paged_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    *,
    sm_scale: float,
    decode_keys: int | None = None,
) -> jax.Array:  # [B, H, D]
    """Decode attention over work items of ``decode_keys`` keys of one sequence.

    The items of all sequences are packed and run ``B`` at a time, so a step costs the keys
    the sequences hold, not ``B`` times the longest context: rows with no context (padding)
    and the unused pages of short sequences are never gathered. Each item's partial softmax
    is folded into its sequence's running max, sum and accumulator.
    """
    B, H, D = q.shape
    P, K = k_pages.shape[1], k_pages.shape[2]
    M = block_tables.shape[1]
    G = H // K
    if B == 0 or M == 0:
        return jnp.zeros_like(q)
    c = max(1, min(M, (decode_keys or FALLBACK.decode_keys) // P))  # pages per item
    C = _cdiv(M, c)  # items of the longest possible context
    bt_bcc = jnp.pad(block_tables, ((0, 0), (0, C * c - M))).reshape(B, C, c)
    len_b = jnp.clip(context_lens.astype(jnp.int32), 0, M * P)
    items_b = _cdiv(len_b, c * P)
    ends_b = jnp.cumsum(items_b)
    num_items = ends_b[-1]
    q_bkgd = q.reshape(B, K, G, D).astype(jnp.float32) * sm_scale

    def body(i, carry):
        m_b, l_b, acc_b = carry  # [B, K, G], [B, K, G], [B, K, G, D]
        w_r = i * B + jnp.arange(B, dtype=jnp.int32)  # this round's B items
        seq_r = jnp.minimum(jnp.searchsorted(ends_b, w_r, side="right"), B - 1)
        chunk_r = jnp.clip(w_r - ends_b[seq_r] + items_b[seq_r], 0, C - 1)
        ids_rc = bt_bcc[seq_r, chunk_r]
        k_rskd = k_pages[ids_rc].reshape(B, c * P, K, D).astype(jnp.float32)
        v_rskd = v_pages[ids_rc].reshape(B, c * P, K, D).astype(jnp.float32)
        logits_rkgs = jnp.einsum("rkgd,rskd->rkgs", q_bkgd[seq_r], k_rskd)
        s_rs = chunk_r[:, None] * (c * P) + jnp.arange(c * P, dtype=jnp.int32)
        mask_rs = (s_rs < len_b[seq_r, None]) & (w_r < num_items)[:, None]
        m_r, l_r, acc_r = _online_softmax_step(
            _init_carry((B, K, G), D),
            logits_rkgs,
            v_rskd,
            mask_rs[:, None, None, :],
            "rkgs,rskd->rkgd",
        )
        # Fold the items into their sequences (an item past the last has l = acc = 0).
        m_new = m_b.at[seq_r].max(m_r)
        alpha_b = jnp.exp(m_b - m_new)
        scale_r = jnp.exp(m_r - m_new[seq_r])
        l_b = alpha_b * l_b + jnp.zeros_like(l_b).at[seq_r].add(scale_r * l_r)
        acc_b = alpha_b[..., None] * acc_b + jnp.zeros_like(acc_b).at[seq_r].add(
            scale_r[..., None] * acc_r
        )
        return m_new, l_b, acc_b

    _, l, acc = lax.fori_loop(0, _cdiv(num_items, B), body, _init_carry((B, K, G), D))
    return _finish(l, acc).reshape(B, H, D).astype(q.dtype)


def ragged_work_items(
    cu_q_lens: jax.Array,  # [B + 1] int32
    num_tokens: int,
    block_q: int,
    *,
    min_q_len: int = 1,
) -> tuple[jax.Array, jax.Array]:  # [W] int32 each
    """Split the packed query tokens into tiles of at most ``block_q`` tokens of one sequence.

    Returns the sequence and first token of each of ``W = ceil(T / block_q) + B`` work items
    (an upper bound on the tiles needed); items past the last tile are empty: they point at
    sequence ``B - 1`` and start at its end. Sequences with fewer than ``min_q_len`` new
    tokens get no tiles.
    """
    num_seqs = cu_q_lens.shape[0] - 1
    num_items = _cdiv(num_tokens, block_q) + num_seqs
    q_lens_b = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles_b = _cdiv(jnp.where(q_lens_b >= min_q_len, jnp.maximum(q_lens_b, 0), 0), block_q)
    ends_b = jnp.cumsum(tiles_b)
    w = jnp.arange(num_items, dtype=jnp.int32)
    seq_w = jnp.searchsorted(ends_b, w, side="right").astype(jnp.int32)
    used = seq_w < num_seqs
    seq_w = jnp.minimum(seq_w, num_seqs - 1)
    first_tile_w = ends_b[seq_w] - tiles_b[seq_w]
    start_w = cu_q_lens[seq_w] + (w - first_tile_w) * block_q
    start_w = jnp.where(used, start_w, cu_q_lens[num_seqs])
    return seq_w, start_w.astype(jnp.int32)


def blockwise_ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    cu_q_lens: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    decode_keys: int | None = None,
) -> jax.Array:  # [T, H, D]
    """Packed queries of several sequences against their pages, causal by absolute position.

    Query token ``t`` of sequence ``b`` (``cu_q_lens[b] <= t < cu_q_lens[b + 1]``) sits at
    position ``context_lens[b] - q_len[b] + (t - cu_q_lens[b])`` and sees that sequence's keys
    at positions up to its own. The new tokens' K/V must already be in the pages.

    Two passes, so that neither decodes nor prefill chunks pay for the other's tile shape:
    the sequences with one new token (decodes) run as one batched
    :func:`blockwise_paged_attention` (one row per sequence), and the sequences with more
    (prefill chunks) run in query tiles of ``block_q`` tokens of one sequence, ``block_k``
    keys per step, stopping at the tile's last position; the loop over tiles ends at the
    last tile in use. Steps with fewer than two tokens per sequence on average (``T < 2B``)
    run every token as a decode row with its sequence's table, as does ``block_q=1``.
    """
    T, H, D = q.shape
    P, K = k_pages.shape[1], k_pages.shape[2]
    B, M = block_tables.shape
    G = H // K
    if T == 0 or B == 0 or M == 0:
        return jnp.zeros_like(q)
    len_b = jnp.clip(context_lens.astype(jnp.int32), 0, M * P)
    t_t = jnp.arange(T, dtype=jnp.int32)
    seq_t = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], t_t, side="right"), B - 1)
    real_t = t_t < cu_q_lens[B]
    if (block_q or FALLBACK.ragged_block_q) == 1 or T < 2 * B:
        pos_t = context_lens[seq_t] - cu_q_lens[seq_t + 1] + t_t
        seen_t = jnp.where(real_t, jnp.clip(pos_t + 1, 0, M * P), 0)
        return blockwise_paged_attention(
            q,
            k_pages,
            v_pages,
            block_tables[seq_t],
            seen_t.astype(jnp.int32),
            sm_scale=sm_scale,
            decode_keys=decode_keys,
        )
    # Decodes: the last token of each one-token sequence, against its whole context.
    q_len_b = cu_q_lens[1:] - cu_q_lens[:-1]
    decode_b = q_len_b == 1
    o_bhd = blockwise_paged_attention(
        q[jnp.clip(cu_q_lens[1:] - 1, 0, T - 1)],
        k_pages,
        v_pages,
        block_tables,
        jnp.where(decode_b, len_b, 0),
        sm_scale=sm_scale,
        decode_keys=decode_keys,
    )
    # Prefill chunks: tiles of one sequence's tokens.
    bq = min(block_q or FALLBACK.ragged_block_q, next_power_of_two(T))
    c = max(1, min(M, (block_k or FALLBACK.ragged_block_k) // P))  # pages per key step
    bt_bm = jnp.pad(block_tables, ((0, 0), (0, _cdiv(M, c) * c - M)))
    seq_w, start_w = ragged_work_items(cu_q_lens, T, bq, min_q_len=2)
    q_lens_b = jnp.where(q_len_b >= 2, jnp.maximum(q_len_b, 0), 0)
    num_items = jnp.sum(_cdiv(q_lens_b, bq))
    q_tkgd = jnp.pad(q, ((0, bq), (0, 0), (0, 0))).reshape(T + bq, K, G, D)

    def item(w, out_tkgd):
        b, start = seq_w[w], start_w[w]
        q_begin, q_end = cu_q_lens[b], cu_q_lens[b + 1]
        q_qkgd = lax.dynamic_slice_in_dim(q_tkgd, start, bq, axis=0).astype(jnp.float32)
        q_qkgd = q_qkgd * sm_scale
        t_q = start + jnp.arange(bq, dtype=jnp.int32)
        valid_q = t_q < q_end
        pos_q = len_b[b] - (q_end - q_begin) + (t_q - q_begin)
        last_pos = jnp.max(jnp.where(valid_q, pos_q, -1))

        def body(j, carry):
            ids_c = lax.dynamic_slice_in_dim(bt_bm[b], j * c, c)
            k_skd = k_pages[ids_c].reshape(c * P, K, D).astype(jnp.float32)
            v_skd = v_pages[ids_c].reshape(c * P, K, D).astype(jnp.float32)
            logits_kgqs = jnp.einsum("qkgd,skd->kgqs", q_qkgd, k_skd)
            s_s = j * c * P + jnp.arange(c * P, dtype=jnp.int32)
            mask_qs = (s_s[None, :] <= pos_q[:, None]) & (s_s[None, :] < len_b[b])
            return _online_softmax_step(carry, logits_kgqs, v_skd, mask_qs, "kgqs,skd->kgqd")

        steps = jnp.maximum(_cdiv(last_pos + 1, c * P), 0)
        _, l, acc = lax.fori_loop(0, steps, body, _init_carry((K, G, bq), D))
        o_qkgd = _finish(l, acc).transpose(2, 0, 1, 3).astype(q.dtype)
        # Rows past the sequence's end keep what is there (a later tile or a decode fills it).
        old_qkgd = lax.dynamic_slice_in_dim(out_tkgd, start, bq, axis=0)
        o_qkgd = jnp.where(valid_q[:, None, None, None], o_qkgd, old_qkgd)
        return lax.dynamic_update_slice_in_dim(out_tkgd, o_qkgd, start, axis=0)

    out = lax.fori_loop(0, num_items, item, jnp.zeros((T + bq, K, G, D), q.dtype))
    o_thd = out[:T].reshape(T, H, D)
    decode_t = real_t & decode_b[seq_t]
    return jnp.where(decode_t[:, None, None], o_bhd[seq_t], o_thd)
