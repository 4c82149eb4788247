"""Paged attention (decode) as a Pallas kernel for the Triton backend.

One query token per sequence attends to that sequence's keys, which live in fixed-size pages
(vLLM's PagedAttention): ``k_pages, v_pages [N, P, K, D]`` hold ``P`` tokens per block, and
``block_tables[b, i]`` is the physical block of the sequence's ``i``-th logical block (any
order; entries past the context point at the null block 0). The query token sits at position
``context_lens[b] - 1`` and sees keys ``0 .. context_lens[b] - 1`` (its own K/V must already
be in the pages; see :mod:`ligerjax.kernels.kv_writer`).

One program owns the query heads of one KV head of one sequence (GQA: they share every key
tile; the group is padded to >= 16 rows for the tensor cores) and a slice of its logical
blocks (flash decoding): the context is split so that batch x KV heads x splits fills the
card even at batch 1. Each split writes its normalised partial output with its running max
and sum, and a small XLA epilogue merges the splits. Key tiles are whole pages gathered
through the block table, ``pages_per_block`` pages at a time.

The page size and head dim must be powers of two (Triton tiles); the dispatcher routes other
shapes to the pure-JAX fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ligerjax.kernels import checks
from ligerjax.kernels.block_sizes import (
    MAX_HEAD_DIM,
    is_power_of_two,
    next_power_of_two,
    paged_block_sizes,
)
from ligerjax.kernels.flash_attention import default_interpret, flash_attention_reference
from ligerjax.kernels.online_softmax import attend_key_tiles, attend_tile, normalise

_FN = "paged_attention"


def _paged_decode_kernel(
    q_ref,  # [G, D]      query heads of one KV head (padded group)
    k_ref,  # [N, P, D]   every page, this KV head
    v_ref,  # [N, P, D]
    bt_ref,  # [M] int32  this sequence's block table (padded to whole splits)
    len_ref,  # [B] int32
    o_ref,  # [G, D] f32  this split's normalised output
    m_ref,  # [G] f32     this split's running max (base 2)
    l_ref,  # [G] f32     this split's running sum
    *,
    sm_scale: float,
    pages_per_block: int,
    pages_per_split: int,
    precision: lax.Precision,
):
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    ctx = len_ref[pl.program_id(0)]
    first_page = pl.program_id(2) * pages_per_split
    first_key = first_page * page_size
    keys = jnp.clip(ctx - first_key, 0, pages_per_split * page_size)  # keys of this split
    hi = pl.cdiv(keys, block_k)
    full = keys // block_k
    q_gd = q_ref[...]

    def key_tile(j, carry, *, masked: bool):
        page0 = first_page + j * pages_per_block
        ids = bt_ref[pl.ds(page0, pages_per_block)]

        def mask_gc():
            key_c = page0 * page_size + jnp.arange(block_k, dtype=jnp.int32)
            return key_c[None, :] < ctx

        return attend_tile(
            carry,
            q_gd,
            k_ref[ids].reshape(block_k, head_dim),
            lambda: v_ref[ids].reshape(block_k, head_dim),
            mask_gc if masked else None,
            sm_scale=sm_scale,
            precision=precision,
        )

    m_g, l_g, acc_gd = attend_key_tiles(key_tile, full, hi, rows, head_dim)
    o_ref[...] = normalise(l_g, acc_gd)
    m_ref[...] = m_g
    l_ref[...] = l_g


def merge_splits(
    o_sbkgd: jax.Array,  # [splits, B, K, G, D] f32, each split normalised
    m_sbkg: jax.Array,  # [splits, B, K, G] f32, running max in base 2
    l_sbkg: jax.Array,  # [splits, B, K, G] f32, running sum
) -> jax.Array:  # [B, K, G, D] f32
    """Combine per-split softmax results; rows no split saw come out 0."""
    m_bkg = jnp.max(m_sbkg, axis=0)
    w_sbkg = l_sbkg * jnp.exp2(m_sbkg - m_bkg[None])
    total_bkg = jnp.sum(w_sbkg, axis=0)
    o_bkgd = jnp.sum(w_sbkg[..., None] * o_sbkgd, axis=0)
    return o_bkgd / jnp.where(total_bkg == 0, 1.0, total_bkg)[..., None]


def num_splits_for(batch: int, kv_heads: int, tiles: int, target_programs: int) -> int:
    """Context splits so that batch x KV heads x splits reaches ``target_programs``."""
    want = pl.cdiv(target_programs, max(1, batch * kv_heads))
    return max(1, min(next_power_of_two(want), tiles))


def _paged_call(
    q_bhd: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    bt_bm: jax.Array,
    len_b: jax.Array,
    *,
    sm_scale: float,
    pages_per_block: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> jax.Array:
    """Pad the group and the block table, build the grid and BlockSpecs, run, merge splits."""
    B, H, D = q_bhd.shape
    N, P, K, _ = k_pages.shape
    M = bt_bm.shape[1]
    G = H // K
    Gp = max(16, next_power_of_two(G))
    tiles = pl.cdiv(M, pages_per_block)
    pages_per_split = pl.cdiv(tiles, num_splits) * pages_per_block
    bt_bm = jnp.pad(bt_bm, ((0, 0), (0, num_splits * pages_per_split - M)))
    q_bkgd = jnp.pad(q_bhd.reshape(B, K, G, D), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    precision = lax.Precision.HIGHEST if q_bhd.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(
        _paged_decode_kernel,
        sm_scale=sm_scale,
        pages_per_block=pages_per_block,
        pages_per_split=pages_per_split,
        precision=precision,
    )
    Mp = bt_bm.shape[1]
    f32 = jnp.float32
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, K, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, Gp, D), lambda b, kh, s: (b, kh, 0, 0)),
            pl.BlockSpec((N, P, None, D), lambda b, kh, s: (0, 0, kh, 0)),
            pl.BlockSpec((N, P, None, D), lambda b, kh, s: (0, 0, kh, 0)),
            pl.BlockSpec((None, Mp), lambda b, kh, s: (b, 0)),
            pl.BlockSpec((B,), lambda b, kh, s: (0,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, D), lambda b, kh, s: (s, b, kh, 0, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, kh, s: (s, b, kh, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, kh, s: (s, b, kh, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, B, K, Gp, D), f32),
            jax.ShapeDtypeStruct((num_splits, B, K, Gp), f32),
            jax.ShapeDtypeStruct((num_splits, B, K, Gp), f32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_kernel",
    )(q_bkgd, k_pages, v_pages, bt_bm, len_b)
    o_bkgd = o[0] if num_splits == 1 else merge_splits(o, m, l)
    return o_bkgd[:, :, :G].reshape(B, H, D).astype(q_bhd.dtype)


_paged_attention_jit = jax.jit(
    _paged_call,
    static_argnames=(
        "sm_scale",
        "pages_per_block",
        "num_splits",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)


def check_paged_args(
    fn: str,
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    q_dims: str = "BHD",
    mixed_dtypes: bool = False,
) -> None:
    """Shapes, dtypes, heads and (when concrete) ids and lengths of a paged attention call.

    ``mixed_dtypes`` lets ``q`` differ from the pages (which must still agree).
    """
    checks.check_rank(fn, "q", q, q_dims)
    checks.check_rank(fn, "k_pages", k_pages, "NPKD")
    checks.check_float(fn, "q", q)
    checks.check_float(fn, "k_pages", k_pages)
    checks.check_float(fn, "v_pages", v_pages)
    H, D = q.shape[-2], q.shape[-1]
    N, P, K, Dk = k_pages.shape
    if Dk != D:
        raise ValueError(f"{fn}: k_pages head dim {Dk} differs from q head dim {D}")
    checks.check_shape(fn, "v_pages", v_pages, k_pages.shape, "NPKD")
    if not mixed_dtypes:
        checks.check_same_dtype(fn, ("q", "k_pages"), (q, k_pages))
    checks.check_same_dtype(fn, ("k_pages", "v_pages"), (k_pages, v_pages))
    checks.check_heads(fn, H, K, "k_pages")
    checks.check_rank(fn, "block_tables", block_tables, "BM")
    checks.check_int32(fn, "block_tables", block_tables)
    B, M = block_tables.shape
    if q_dims == "BHD" and q.shape[0] != B:
        raise ValueError(f"{fn}: block_tables has {B} rows; q has batch {q.shape[0]}")
    checks.check_shape(fn, "context_lens", context_lens, (B,), "B")
    checks.check_int32(fn, "context_lens", context_lens)
    if N < 1 or P < 1:
        raise ValueError(f"{fn}: k_pages has shape {k_pages.shape}; needs N >= 1 and P >= 1")
    checks.check_values_in_range(fn, "block_tables", block_tables, 0, N)
    checks.check_values_in_range(fn, "context_lens", context_lens, 0, M * P + 1)


def check_pallas_paged_shapes(fn: str, head_dim: int, page_size: int) -> None:
    """The Triton kernels need power-of-two pages and head dims (>= 16 for the dots)."""
    if not is_power_of_two(head_dim) or not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{fn}: q head dim D={head_dim} must be a power of two in [16, {MAX_HEAD_DIM}] "
            "for the Pallas kernel (the fallback takes any)"
        )
    if not is_power_of_two(page_size):
        raise ValueError(
            f"{fn}: k_pages page size P={page_size} must be a power of two for the Pallas "
            "kernel (the fallback takes any)"
        )


def pallas_paged_supported(head_dim: int, page_size: int) -> bool:
    return (
        is_power_of_two(head_dim)
        and 16 <= head_dim <= MAX_HEAD_DIM
        and (is_power_of_two(page_size))
    )


def paged_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    *,
    sm_scale: float | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [B, H, D]
    """Decode attention of one query token per sequence over its paged K/V.

    Sequence ``b`` sees keys ``0 .. context_lens[b] - 1``, logical block ``i`` of which lives
    in physical block ``block_tables[b, i]``; a context of 0 gives 0. ``H`` must be a multiple
    of ``K`` (GQA/MQA). ``sm_scale`` defaults to ``1/sqrt(D)``. ``num_splits`` (default: enough
    programs for the card, :data:`~ligerjax.kernels.block_sizes.PAGED_ATTENTION`) splits each
    context over several programs. ``interpret`` defaults to ``True`` off GPU. Block ids and
    lengths are range-checked when they are concrete (not traced).
    """
    check_paged_args(_FN, q, k_pages, v_pages, block_tables, context_lens)
    B, H, D = q.shape
    P, K = k_pages.shape[1], k_pages.shape[2]
    M = block_tables.shape[1]
    check_pallas_paged_shapes(_FN, D, P)
    scale = checks.check_sm_scale(_FN, sm_scale, D)
    tuned = paged_block_sizes(D)
    ppb = pages_per_block or tuned.pages_per_block(P)
    if not is_power_of_two(ppb) or ppb * P < 16:
        raise ValueError(
            f"{_FN}: pages_per_block={ppb} must be a power of two with pages_per_block x P >= 16"
        )
    if B == 0 or H == 0:
        return jnp.zeros(q.shape, q.dtype)
    if M == 0:
        return jnp.zeros(q.shape, q.dtype)
    tiles = pl.cdiv(M, ppb)
    if num_splits is None:
        num_splits = num_splits_for(B, K, tiles, tuned.target_programs)
    elif num_splits < 1:
        raise ValueError(f"{_FN}: num_splits={num_splits} must be >= 1")
    return _paged_attention_jit(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        sm_scale=scale,
        pages_per_block=ppb,
        num_splits=min(num_splits, tiles),
        num_warps=num_warps or tuned.num_warps,
        num_stages=num_stages or tuned.num_stages,
        interpret=default_interpret() if interpret is None else bool(interpret),
    )


def gather_pages(
    pages_npkd: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
) -> jax.Array:  # [B, M * P, K, D]
    """Each sequence's K or V as one dense array, in logical order."""
    B, M = block_tables.shape
    _, P, K, D = pages_npkd.shape
    return pages_npkd[block_tables].reshape(B, M * P, K, D)


def paged_attention_reference(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # [B, H, D]
    """Gather every sequence's pages into dense K/V and run dense masked attention (float32)."""
    k_bskd = gather_pages(k_pages, block_tables)
    v_bskd = gather_pages(v_pages, block_tables)
    out = flash_attention_reference(
        q[:, None],
        k_bskd,
        v_bskd,
        causal=False,
        sm_scale=sm_scale,
        kv_lengths=context_lens,
    )
    return out[:, 0]
