"""Flash attention (prefill) as a Pallas kernel for the Triton backend.

One program computes ``block_q`` query rows of one query head of one sequence: it keeps the
rows in registers and streams the keys and values of that head's KV head (GQA/MQA: query head
``h`` reads KV head ``h // (H // K)``; K/V are never repeated in memory) in tiles of
``block_k``, with the online softmax of FlashAttention-2 (logits in base 2, one rescale of the
accumulator per tile, one division at the end).

The causal mask is by absolute position: query row ``t`` of sequence ``b`` sits at
``q_positions[b, t]`` (default ``S - T + t``, the last ``T`` tokens) and sees key ``s`` iff
``s <= q_positions[b, t]``; keys at or past ``kv_lengths[b]`` are never seen. So a chunk of new
tokens attends correctly to a cached prefix (JAX's own ``mha`` masks from the top left). The
key loop stops at the tile holding the last key the block can see, and the tiles that every
row sees whole run without a mask. Rows that see no key give 0.

Tile shapes must be powers of two for Triton, so the wrapper pads the head dim to a power of
two (>= 16) and the query and key lengths to a whole number of tiles; padded keys lie past
``kv_lengths`` and padded rows are dropped.
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
    flash_block_sizes,
    is_power_of_two,
    next_power_of_two,
)
from ligerjax.kernels.online_softmax import attend_key_tiles, attend_tile, normalise

_FN = "flash_attention"


def _flash_kernel(
    q_ref,  # [block_q, D]
    k_ref,  # [S, D]      this KV head's keys, whole (padded) sequence
    v_ref,  # [S, D]
    pos_ref,  # [block_q] int32
    len_ref,  # [B] int32
    o_ref,  # [block_q, D]
    *,
    causal: bool,
    sm_scale: float,
    block_k: int,
    precision: lax.Precision,
):
    block_q, head_dim = q_ref.shape
    kv_len = len_ref[pl.program_id(1)]
    q_qd = q_ref[...]
    pos_q = pos_ref[...]
    if causal:
        hi = jnp.minimum(pl.cdiv(jnp.max(pos_q) + 1, block_k), pl.cdiv(kv_len, block_k))
        full = jnp.minimum(jnp.maximum(jnp.min(pos_q) + 1, 0), kv_len) // block_k
    else:
        hi = pl.cdiv(kv_len, block_k)
        full = kv_len // block_k
    hi = jnp.maximum(hi, 0)
    full = jnp.minimum(jnp.maximum(full, 0), hi)

    def key_tile(j, carry, *, masked: bool):
        start = pl.multiple_of(j * block_k, block_k)

        def mask_qc():
            key_c = start + jnp.arange(block_k, dtype=jnp.int32)
            mask_qc = key_c[None, :] < kv_len
            if causal:
                mask_qc = mask_qc & (key_c[None, :] <= pos_q[:, None])
            return mask_qc

        return attend_tile(
            carry,
            q_qd,
            k_ref[pl.ds(start, block_k), :],
            lambda: v_ref[pl.ds(start, block_k), :],
            mask_qc if masked else None,
            sm_scale=sm_scale,
            precision=precision,
        )

    _, l_q, acc_qd = attend_key_tiles(key_tile, full, hi, block_q, head_dim)
    o_ref[...] = normalise(l_q, acc_qd).astype(o_ref.dtype)


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _flash_call(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    pos_bt: jax.Array,
    len_b: jax.Array,
    *,
    causal: bool,
    sm_scale: float,
    block_q: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> jax.Array:
    """Pad to tile multiples, build the grid and BlockSpecs, run the kernel, unpad."""
    B, T, H, D = q_bthd.shape
    S, K = k_bskd.shape[1], k_bskd.shape[2]
    G = H // K
    Dp = max(16, next_power_of_two(D))
    Tp = pl.cdiv(T, block_q) * block_q
    Sp = pl.cdiv(S, block_k) * block_k
    q_bthd = _pad_axis(_pad_axis(q_bthd, 3, Dp), 1, Tp)
    k_bskd = _pad_axis(_pad_axis(k_bskd, 3, Dp), 1, Sp)
    v_bskd = _pad_axis(_pad_axis(v_bskd, 3, Dp), 1, Sp)
    pos_bt = _pad_axis(pos_bt, 1, Tp, value=-1)
    precision = lax.Precision.HIGHEST if q_bthd.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(
        _flash_kernel, causal=causal, sm_scale=sm_scale, block_k=block_k, precision=precision
    )
    out = pl.pallas_call(
        kernel,
        grid=(Tp // block_q, B, H),
        in_specs=[
            pl.BlockSpec((None, block_q, None, Dp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, h // G, 0)),
            pl.BlockSpec((None, Sp, None, Dp), lambda i, b, h: (b, 0, h // G, 0)),
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
            pl.BlockSpec((B,), lambda i, b, h: (0,)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, Dp), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, Dp), q_bthd.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention_kernel",
    )(q_bthd, k_bskd, v_bskd, pos_bt, len_b)
    return out[:, :T, :, :D]


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "sm_scale",
        "block_q",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _flash_attention_jit(q, k, v, q_positions, kv_lengths, **static):
    return _flash_call(q, k, v, q_positions, kv_lengths, **static)


def default_interpret() -> bool:
    """Interpret Pallas kernels unless the default backend is a GPU."""
    return jax.default_backend() not in ("gpu", "cuda", "rocm")


def check_attention_args(
    fn: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array | None,
    kv_lengths: jax.Array | None,
    *,
    mixed_dtypes: bool = False,
) -> None:
    """Shapes, dtypes and head counts of a dense attention call (``ValueError`` on misfit).

    ``mixed_dtypes`` lets ``q`` differ from ``k``/``v`` (which must still agree).
    """
    checks.check_rank(fn, "q", q, "BTHD")
    checks.check_rank(fn, "k", k, "BSKD")
    checks.check_float(fn, "q", q)
    checks.check_float(fn, "k", k)
    checks.check_float(fn, "v", v)
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    checks.check_shape(fn, "k", k, (B, S, K, D), "BSKD")
    checks.check_shape(fn, "v", v, (B, S, K, D), "BSKD")
    if not mixed_dtypes:
        checks.check_same_dtype(fn, ("q", "k"), (q, k))
    checks.check_same_dtype(fn, ("k", "v"), (k, v))
    checks.check_heads(fn, H, K, "k")
    if q_positions is not None:
        checks.check_shape(fn, "q_positions", q_positions, (B, T), "BT")
        checks.check_int32(fn, "q_positions", q_positions)
    if kv_lengths is not None:
        checks.check_shape(fn, "kv_lengths", kv_lengths, (B,), "B")
        checks.check_int32(fn, "kv_lengths", kv_lengths)
        checks.check_values_in_range(fn, "kv_lengths", kv_lengths, 0, S + 1)


def flash_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_positions: jax.Array | None = None,  # [B, T] int32
    kv_lengths: jax.Array | None = None,  # [B] int32
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [B, T, H, D]
    """Flash attention with GQA, absolute-position causal masking and ragged lengths.

    ``H`` must be a multiple of ``K``. Query row ``t`` of sequence ``b`` sits at
    ``q_positions[b, t]`` (default ``S - T + t``) and, when ``causal``, sees the keys at
    positions ``<= q_positions[b, t]``; keys at or past ``kv_lengths[b]`` (default ``S``) are
    ignored; rows that see no key give 0. ``sm_scale`` defaults to ``1/sqrt(D)``. Tiles default
    to :data:`ligerjax.kernels.block_sizes.FLASH_ATTENTION` (shrunk for short inputs);
    ``interpret`` defaults to ``True`` unless the default backend is a GPU. Compute is in
    float32 (IEEE dots for float32 inputs); the output has ``q``'s dtype.
    """
    check_attention_args(_FN, q, k, v, q_positions, kv_lengths)
    B, T, H, D = q.shape
    S = k.shape[1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{_FN}: q head dim D={D} above the largest supported {MAX_HEAD_DIM}")
    scale = checks.check_sm_scale(_FN, sm_scale, D)
    tuned = flash_block_sizes(D)
    bq = _tile(block_q, tuned.block_q, T, "block_q")
    bk = _tile(block_k, tuned.block_k, S, "block_k")
    if num_warps is not None and not is_power_of_two(num_warps):
        raise ValueError(f"{_FN}: num_warps={num_warps} must be a power of two")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"{_FN}: num_stages={num_stages} must be >= 1")
    if q_positions is None:
        q_positions = jnp.broadcast_to(S - T + jnp.arange(T, dtype=jnp.int32), (B, T))
    if kv_lengths is None:
        kv_lengths = jnp.full((B,), S, jnp.int32)
    if B * T * H == 0:
        return jnp.zeros(q.shape, q.dtype)
    if S == 0:
        return jnp.zeros(q.shape, q.dtype)
    return _flash_attention_jit(
        q,
        k,
        v,
        q_positions,
        kv_lengths,
        causal=bool(causal),
        sm_scale=scale,
        block_q=bq,
        block_k=bk,
        num_warps=num_warps or tuned.num_warps,
        num_stages=num_stages or tuned.num_stages,
        interpret=default_interpret() if interpret is None else bool(interpret),
    )


def _tile(requested: int | None, tuned: int, length: int, name: str) -> int:
    """A power-of-two tile >= 16: the request, or the tuned one shrunk to fit ``length``."""
    if requested is not None:
        if not is_power_of_two(requested) or requested < 16:
            raise ValueError(f"{_FN}: {name}={requested} must be a power of two >= 16")
        return requested
    return max(16, min(tuned, next_power_of_two(length)))


def flash_attention_reference(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_positions: jax.Array | None = None,  # [B, T] int32
    kv_lengths: jax.Array | None = None,  # [B] int32
) -> jax.Array:  # [B, T, H, D]
    """Dense masked softmax(QKᵀ)V in float32 with the same mask and defaults as the kernel."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = float(D) ** -0.5 if sm_scale is None else float(sm_scale)
    if q_positions is None:
        q_positions = jnp.broadcast_to(S - T + jnp.arange(T, dtype=jnp.int32), (B, T))
    if kv_lengths is None:
        kv_lengths = jnp.full((B,), S, jnp.int32)
    q_btkgd = q.reshape(B, T, K, H // K, D).astype(jnp.float32)
    logits_bkgts = jnp.einsum(
        "btkgd,bskd->bkgts", q_btkgd, k.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    logits_bkgts = logits_bkgts * scale
    s_s = jnp.arange(S, dtype=jnp.int32)
    mask_bts = s_s[None, None, :] < kv_lengths[:, None, None]
    if causal:
        mask_bts = mask_bts & (s_s[None, None, :] <= q_positions[:, :, None])
    mask = mask_bts[:, None, None]
    logits_bkgts = jnp.where(mask, logits_bkgts, -jnp.inf)
    m = jnp.max(logits_bkgts, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits_bkgts - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o_bkgtd = jnp.einsum(
        "bkgts,bskd->bkgtd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    o_bkgtd = o_bkgtd / jnp.where(denom == 0, 1.0, denom)
    return o_bkgtd.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)
