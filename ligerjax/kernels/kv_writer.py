"""Write the new tokens' K/V into the paged cache by slot mapping (vLLM's reshape-and-cache).

Token ``t``'s key and value go to slot ``slot_mapping[t]`` of the cache, slot ``s`` being
token ``s % P`` of block ``s // P``; a padding token's slot is negative (vLLM's -1) or
``N * P`` (one past the end), and writes nothing. On
every backend this is one XLA scatter per array into the pages viewed as ``[N * P, K, D]``
(a free reshape), in place when the pages are donated, which is what the engine's step does:
a scatter is already a single memory-bound pass, so there is no Pallas kernel to win here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ligerjax.kernels import checks

_FN = "write_kv_pages"


def _write(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    N, P, K, D = k_pages.shape
    slots = N * P
    # Padding (negative or N * P) becomes N * P, out of range, and mode="drop" skips it.
    slot_t = jnp.where(slot_mapping < 0, slots, slot_mapping)

    def scatter(pages_npkd, new_tkd):
        flat_skd = pages_npkd.reshape(slots, K, D)
        flat_skd = flat_skd.at[slot_t].set(new_tkd.astype(pages_npkd.dtype), mode="drop")
        return flat_skd.reshape(N, P, K, D)

    return scatter(k_pages, k), scatter(v_pages, v)


_write_jit = jax.jit(_write)
_write_donated_jit = jax.jit(_write, donate_argnums=(0, 1))


def write_kv_pages(
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # [T] int32
    *,
    donate: bool = False,
) -> tuple[jax.Array, jax.Array]:  # [N, P, K, D] each
    """The pages with token ``t``'s K/V written at slot ``slot_mapping[t]``.

    Padding tokens carry slot -1 (any negative) or ``N * P``; they write nothing.

    ``donate=True`` hands the old pages to XLA so the write happens in place (the caller must
    not use them afterwards); inside a jitted step, donate the step's pages instead. Slots are
    range-checked when concrete; two tokens writing one slot leave an unspecified winner.
    """
    checks.check_rank(_FN, "k_pages", k_pages, "NPKD")
    checks.check_float(_FN, "k_pages", k_pages)
    checks.check_shape(_FN, "v_pages", v_pages, k_pages.shape, "NPKD")
    checks.check_same_dtype(_FN, ("k_pages", "v_pages"), (k_pages, v_pages))
    N, P, K, D = k_pages.shape
    checks.check_rank(_FN, "k", k, "TKD")
    T = k.shape[0]
    checks.check_shape(_FN, "k", k, (T, K, D), "TKD")
    checks.check_shape(_FN, "v", v, (T, K, D), "TKD")
    checks.check_float(_FN, "k", k)
    checks.check_float(_FN, "v", v)
    checks.check_shape(_FN, "slot_mapping", slot_mapping, (T,), "T")
    checks.check_int32(_FN, "slot_mapping", slot_mapping)
    slots = checks.concrete(slot_mapping)
    if slots is not None and (slots > N * P).any():
        bad = int(np.argmax(slots > N * P))
        raise ValueError(
            f"{_FN}: slot_mapping[{bad}]={int(slots[bad])} is out of range [0, {N * P}) "
            f"(N={N} blocks of P={P}; padding is -1 or {N * P})"
        )
    fn = _write_donated_jit if donate else _write_jit
    return fn(k_pages, v_pages, k, v, slot_mapping)


@functools.partial(jax.jit, static_argnames=("page_size",))
def slot_mapping_for(
    block_tables: jax.Array,  # [B, M] int32
    positions: jax.Array,  # [T] int32, position of each packed token in its sequence
    seq_ids: jax.Array,  # [T] int32, sequence of each packed token (< 0: padding)
    *,
    page_size: int,
) -> jax.Array:  # [T] int32
    """Slots of packed tokens: block ``block_tables[b, pos // P]``, offset ``pos % P``."""
    b_t = jnp.maximum(seq_ids, 0)
    block_t = block_tables[b_t, positions // page_size]
    slot_t = block_t * page_size + positions % page_size
    return jnp.where(seq_ids < 0, -1, slot_t).astype(jnp.int32)


def write_kv_pages_reference(
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    k: jax.Array,  # [T, K, D]
    v: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # [T] int32
) -> tuple[np.ndarray, np.ndarray]:
    """One token at a time in numpy."""
    k_out, v_out = np.array(k_pages), np.array(v_pages)
    P = k_out.shape[1]
    for t, slot in enumerate(np.asarray(slot_mapping).tolist()):
        if 0 <= slot < k_out.shape[0] * P:
            k_out[slot // P, slot % P] = np.asarray(k[t]).astype(k_out.dtype)
            v_out[slot // P, slot % P] = np.asarray(v[t]).astype(v_out.dtype)
    return k_out, v_out
