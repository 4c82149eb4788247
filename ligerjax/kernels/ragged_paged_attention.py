"""Ragged paged attention (mixed batches) as a Pallas kernel for the Triton backend.

Modern engines run chunked prefill and decode in one step: the new tokens of several
sequences are packed into one ``q [T, H, D]``, sequence ``b`` owning tokens
``cu_q_lens[b] .. cu_q_lens[b + 1] - 1``, and each token attends to its own sequence's paged
cache, new tokens included (their K/V are written to the pages first, see
:mod:`ligerjax.kernels.kv_writer`). Token ``t`` of sequence ``b`` sits at position
``context_lens[b] - q_len[b] + (t - cu_q_lens[b])`` and sees keys at positions up to its own:
a decode is a sequence with ``q_len = 1``, a prefill chunk one with ``q_len > 1``.

The wrapper cuts the packed tokens into work items of at most ``block_q`` tokens of one
sequence (``ceil(T / block_q) + B`` items, the spare ones empty); one program owns one item
and one KV head, with the item's tokens times the KV head's query heads as rows
(``block_q x G`` rows, ``G`` padded to a power of two), and streams that sequence's keys
through its block table, stopping at the item's last position. Rows that belong to the next
sequence are masked out of the store. Page size and head dim must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ligerjax.kernels import checks
from ligerjax.kernels.block_sizes import is_power_of_two, next_power_of_two, paged_block_sizes
from ligerjax.kernels.fallback import ragged_work_items
from ligerjax.kernels.flash_attention import default_interpret, flash_attention_reference
from ligerjax.kernels.online_softmax import attend_key_tiles, attend_tile, normalise
from ligerjax.kernels.paged_attention import (
    check_paged_args,
    check_pallas_paged_shapes,
    gather_pages,
)

_FN = "ragged_paged_attention"


def _ragged_kernel(
    seq_ref,  # [W] int32      sequence of each work item
    start_ref,  # [W] int32    first packed token of each work item
    cu_ref,  # [B + 1] int32
    len_ref,  # [B] int32
    bt_ref,  # [B, M] int32
    q_ref,  # [T, G, D]       packed queries, query heads of one KV head
    k_ref,  # [N, P, D]       every page, this KV head
    v_ref,  # [N, P, D]
    o_ref,  # [T, G, D]
    *,
    sm_scale: float,
    block_q: int,
    pages_per_block: int,
    precision: lax.Precision,
):
    _, group, head_dim = q_ref.shape
    rows = block_q * group
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    w = pl.program_id(0)
    b, start = seq_ref[w], start_ref[w]
    q_begin, q_end, ctx = cu_ref[b], cu_ref[b + 1], len_ref[b]
    first_pos = ctx - q_end + start  # position of the item's first token
    n_tokens = jnp.clip(q_end - start, 0, block_q)
    last_pos = first_pos + n_tokens - 1
    hi = jnp.where(n_tokens > 0, pl.cdiv(jnp.maximum(last_pos + 1, 0), block_k), 0)
    full = jnp.clip(jnp.minimum(first_pos + 1, ctx) // block_k, 0, hi)
    del q_begin

    token_r = start + jnp.arange(rows, dtype=jnp.int32) // group
    pos_r = ctx - q_end + token_r
    q_rd = q_ref[pl.ds(start, block_q), :, :].reshape(rows, head_dim)

    def key_tile(j, carry, *, masked: bool):
        ids = bt_ref[b, pl.ds(j * pages_per_block, pages_per_block)]

        def mask_rc():
            key_c = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
            return (key_c[None, :] <= pos_r[:, None]) & (key_c[None, :] < ctx)

        return attend_tile(
            carry,
            q_rd,
            k_ref[ids].reshape(block_k, head_dim),
            lambda: v_ref[ids].reshape(block_k, head_dim),
            mask_rc if masked else None,
            sm_scale=sm_scale,
            precision=precision,
        )

    _, l_r, acc_rd = attend_key_tiles(key_tile, full, hi, rows, head_dim)
    o_rd = normalise(l_r, acc_rd)
    o_qgd = o_rd.reshape(block_q, group, head_dim).astype(o_ref.dtype)
    token_q = start + jnp.arange(block_q, dtype=jnp.int32)
    mask_qgd = jnp.broadcast_to((token_q < q_end)[:, None, None], o_qgd.shape)
    plgpu.store(o_ref.at[pl.ds(start, block_q), :, :], o_qgd, mask=mask_qgd)


def _ragged_call(
    q_thd: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    bt_bm: jax.Array,
    len_b: jax.Array,
    cu_b1: jax.Array,
    *,
    sm_scale: float,
    block_q: int,
    pages_per_block: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> jax.Array:
    """Work items, padding, grid and BlockSpecs; run the kernel; unpad."""
    T, H, D = q_thd.shape
    N, P, K, _ = k_pages.shape
    B, M = bt_bm.shape
    G = H // K
    Gp = next_power_of_two(G)
    Tp = T + block_q  # every item's tile [start, start + block_q) lies inside
    Mp = pl.cdiv(M, pages_per_block) * pages_per_block
    bt_bm = jnp.pad(bt_bm, ((0, 0), (0, Mp - M)))
    q_tkgd = jnp.pad(q_thd.reshape(T, K, G, D), ((0, Tp - T), (0, 0), (0, Gp - G), (0, 0)))
    seq_w, start_w = ragged_work_items(cu_b1, T, block_q)
    W = seq_w.shape[0]
    precision = lax.Precision.HIGHEST if q_thd.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(
        _ragged_kernel,
        sm_scale=sm_scale,
        block_q=block_q,
        pages_per_block=pages_per_block,
        precision=precision,
    )
    whole = lambda *shape: pl.BlockSpec(shape, lambda w, kh: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(W, K),
        in_specs=[
            whole(W),
            whole(W),
            whole(B + 1),
            whole(B),
            whole(B, Mp),
            pl.BlockSpec((Tp, None, Gp, D), lambda w, kh: (0, kh, 0, 0)),
            pl.BlockSpec((N, P, None, D), lambda w, kh: (0, 0, kh, 0)),
            pl.BlockSpec((N, P, None, D), lambda w, kh: (0, 0, kh, 0)),
        ],
        out_specs=pl.BlockSpec((Tp, None, Gp, D), lambda w, kh: (0, kh, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((Tp, K, Gp, D), q_thd.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_kernel",
    )(seq_w, start_w, cu_b1, len_b, bt_bm, q_tkgd, k_pages, v_pages)
    out_thd = out[:T, :, :G].reshape(T, H, D)
    packed_t = jnp.arange(T, dtype=jnp.int32) < cu_b1[B]
    return jnp.where(packed_t[:, None, None], out_thd, 0)  # rows past the last sequence


_ragged_attention_jit = jax.jit(
    _ragged_call,
    static_argnames=(
        "sm_scale",
        "block_q",
        "pages_per_block",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)


def check_ragged_args(
    fn: str,
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    mixed_dtypes: bool = False,
) -> None:
    """Everything :func:`check_paged_args` checks, plus ``cu_q_lens`` (shape, dtype, order)."""
    check_paged_args(
        fn,
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        q_dims="THD",
        mixed_dtypes=mixed_dtypes,
    )
    T = q.shape[0]
    B = block_tables.shape[0]
    checks.check_shape(fn, "cu_q_lens", cu_q_lens, (B + 1,), "B + 1")
    checks.check_int32(fn, "cu_q_lens", cu_q_lens)
    cu = checks.concrete(cu_q_lens)
    lens = checks.concrete(context_lens)
    if cu is None:
        return
    if cu[0] != 0 or (cu[1:] < cu[:-1]).any() or cu[-1] > T:
        raise ValueError(
            f"{fn}: cu_q_lens={cu.tolist()} must start at 0, never decrease and end <= T={T}"
        )
    if lens is not None and (lens < cu[1:] - cu[:-1]).any():
        raise ValueError(
            f"{fn}: context_lens={lens.tolist()} must count each sequence's new tokens "
            f"(q_lens {(cu[1:] - cu[:-1]).tolist()})"
        )


def ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32, new tokens included
    cu_q_lens: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [T, H, D]
    """Causal attention of packed new tokens of several sequences over their paged K/V.

    Sequence ``b`` owns tokens ``cu_q_lens[b] .. cu_q_lens[b + 1] - 1`` of ``q`` and has
    ``context_lens[b]`` tokens in its pages, its new ones last (written before this call);
    each new token sees the keys at positions up to its own. Tokens past ``cu_q_lens[B]``
    (padding) give 0. ``block_q`` (tokens per program) defaults to fill
    :data:`~ligerjax.kernels.block_sizes.PAGED_ATTENTION` ``rows``. ``interpret`` defaults to
    ``True`` off GPU.
    """
    check_ragged_args(_FN, q, k_pages, v_pages, block_tables, context_lens, cu_q_lens)
    T, H, D = q.shape
    P, K = k_pages.shape[1], k_pages.shape[2]
    B, M = block_tables.shape
    check_pallas_paged_shapes(_FN, D, P)
    scale = checks.check_sm_scale(_FN, sm_scale, D)
    tuned = paged_block_sizes(D)
    Gp = next_power_of_two(H // K)
    if block_q is None:
        block_q = max(1, tuned.rows // Gp)
    if not is_power_of_two(block_q) or block_q * Gp < 16:
        raise ValueError(
            f"{_FN}: block_q={block_q} must be a power of two with block_q x {Gp} "
            "(padded query heads per KV head) >= 16"
        )
    ppb = pages_per_block or tuned.pages_per_block(P)
    if not is_power_of_two(ppb) or ppb * P < 16:
        raise ValueError(
            f"{_FN}: pages_per_block={ppb} must be a power of two with pages_per_block x P >= 16"
        )
    if T == 0 or H == 0 or B == 0 or M == 0:
        return jnp.zeros(q.shape, q.dtype)
    return _ragged_attention_jit(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        cu_q_lens,
        sm_scale=scale,
        block_q=block_q,
        pages_per_block=ppb,
        num_warps=num_warps or tuned.num_warps,
        num_stages=num_stages or tuned.num_stages,
        interpret=default_interpret() if interpret is None else bool(interpret),
    )


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    cu_q_lens: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # [T, H, D]
    """Per token: gather its sequence's dense K/V and run dense causal attention (float32)."""
    T = q.shape[0]
    B = block_tables.shape[0]
    t_t = jnp.arange(T, dtype=jnp.int32)
    seq_t = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t_t, side="right"), 0, B - 1)
    valid_t = t_t < cu_q_lens[B]
    pos_t = context_lens[seq_t] - cu_q_lens[seq_t + 1] + t_t
    k_bskd = gather_pages(k_pages, block_tables)[seq_t]  # [T, S, K, D]
    v_bskd = gather_pages(v_pages, block_tables)[seq_t]
    out = flash_attention_reference(
        q[:, None],
        k_bskd,
        v_bskd,
        causal=True,
        sm_scale=sm_scale,
        q_positions=jnp.where(valid_t, pos_t, -1)[:, None].astype(jnp.int32),
        kv_lengths=context_lens[seq_t].astype(jnp.int32),
    )
    return out[:, 0]
