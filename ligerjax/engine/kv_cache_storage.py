"""Device KV pages, host swap buffers, and the block moves a ``SchedulerOutput`` asks for.

Per layer, K and V are each ``[N, P, K, D]`` (blocks, tokens per block, KV heads, head dim);
block 0 is the null block. The number of blocks comes from a memory budget. The moves take
the scheduler's plain (src, dst) pairs, padded to a power-of-two count with ``(0, 0)`` (the
null block onto itself), so a handful of programs serve every step; the device pages are
donated, so a move costs no second copy of the cache.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ligerjax.engine.block_pool import NULL_BLOCK_ID


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the KV cache of one model (per device, after any tensor-parallel split)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCacheSpec.{name}={value!r}: must be an int >= 1")
        try:
            jnp.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"KVCacheSpec.dtype={self.dtype!r}: not a dtype") from e

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block over all layers."""
        itemsize = jnp.dtype(self.dtype).itemsize
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def page_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        return (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def num_blocks_for_budget(self, memory_bytes: int) -> int:
        """Blocks (null block included) that fit ``memory_bytes``; ``ValueError`` if < 2."""
        num_blocks = memory_bytes // self.bytes_per_block
        if num_blocks < 2:
            raise ValueError(
                f"memory_bytes={memory_bytes}: fits {num_blocks} KV blocks of "
                f"{self.bytes_per_block} bytes; need at least 2 (block 0 is null)"
            )
        return int(num_blocks)


def num_blocks_for_budget(
    memory_bytes: int,
    num_layers: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: str = "bfloat16",
) -> int:
    """How many KV blocks (null block included) fit ``memory_bytes``."""
    spec = KVCacheSpec(num_layers, block_size, kv_heads, head_dim, dtype)
    return spec.num_blocks_for_budget(memory_bytes)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVPages:
    """Device K and V pages, one ``[N, P, K, D]`` array each per layer."""

    k: tuple[jax.Array, ...]  # L x [N, P, K, D]
    v: tuple[jax.Array, ...]  # L x [N, P, K, D]

    @property
    def num_blocks(self) -> int:
        return int(self.k[0].shape[0])


def allocate_kv_pages(
    spec: KVCacheSpec, num_blocks: int, *, sharding: jax.sharding.Sharding | None = None
) -> KVPages:
    """Zeroed pages for ``num_blocks`` blocks (``sharding`` places each layer's arrays)."""
    if num_blocks < 2:
        raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is null)")
    shape, dtype = spec.page_shape(num_blocks), jnp.dtype(spec.dtype)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KVPages(
        tuple(zeros() for _ in range(spec.num_layers)),
        tuple(zeros() for _ in range(spec.num_layers)),
    )


@dataclass(frozen=True)
class HostKVBuffer:
    """Host (numpy) swap space: ``[L, S, P, K, D]`` for K and for V, S host slots."""

    k_lspkd: np.ndarray  # [L, S, P, K, D]
    v_lspkd: np.ndarray  # [L, S, P, K, D]

    @classmethod
    def allocate(cls, spec: KVCacheSpec, num_host_blocks: int) -> HostKVBuffer:
        shape = (spec.num_layers, *spec.page_shape(num_host_blocks))
        dtype = jnp.dtype(spec.dtype)
        return cls(np.zeros(shape, dtype), np.zeros(shape, dtype))


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _padded_indices(pairs: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Sources and destinations as int32 arrays, padded with null-block pairs."""
    size = _bucket(len(pairs))
    src = np.full(size, NULL_BLOCK_ID, np.int32)
    dst = np.full(size, NULL_BLOCK_ID, np.int32)
    if pairs:
        src[: len(pairs)], dst[: len(pairs)] = zip(*pairs, strict=True)
    return src, dst


@functools.partial(jax.jit, donate_argnums=0)
def _copy(pages: KVPages, src_c: jax.Array, dst_c: jax.Array) -> KVPages:
    # Every layer gathers all sources before it scatters: copies see the pre-step contents.
    move = lambda x_npkd: x_npkd.at[dst_c].set(x_npkd[src_c])  # noqa: E731
    return KVPages(tuple(map(move, pages.k)), tuple(map(move, pages.v)))


@jax.jit
def _gather(pages: KVPages, src_c: jax.Array) -> tuple[jax.Array, jax.Array]:
    k_lcpkd = jnp.stack([k[src_c] for k in pages.k])
    v_lcpkd = jnp.stack([v[src_c] for v in pages.v])
    return k_lcpkd, v_lcpkd


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(pages: KVPages, dst_c: jax.Array, k_lcpkd: jax.Array, v_lcpkd: jax.Array) -> KVPages:
    k = tuple(x.at[dst_c].set(k_lcpkd[i]) for i, x in enumerate(pages.k))
    v = tuple(x.at[dst_c].set(v_lcpkd[i]) for i, x in enumerate(pages.v))
    return KVPages(k, v)


def copy_blocks(pages: KVPages, pairs: Sequence[tuple[int, int]]) -> KVPages:
    """Copy-on-write moves: block ``dst`` gets block ``src``'s contents (pages donated)."""
    if not pairs:
        return pages
    src, dst = _padded_indices(pairs)
    return _copy(pages, src, dst)


def swap_out(pages: KVPages, host: HostKVBuffer, pairs: Sequence[tuple[int, int]]) -> None:
    """Copy (device block, host slot) pairs to the host buffer, in place."""
    if not pairs:
        return
    src, _ = _padded_indices(pairs)
    k_lcpkd, v_lcpkd = jax.device_get(_gather(pages, src))
    slots = [slot for _, slot in pairs]
    host.k_lspkd[:, slots] = k_lcpkd[:, : len(pairs)]
    host.v_lspkd[:, slots] = v_lcpkd[:, : len(pairs)]


def swap_in(pages: KVPages, host: HostKVBuffer, pairs: Sequence[tuple[int, int]]) -> KVPages:
    """Copy (host slot, device block) pairs back to the device (pages donated)."""
    if not pairs:
        return pages
    _, dst = _padded_indices(pairs)
    slots = [slot for slot, _ in pairs]
    shape = (host.k_lspkd.shape[0], len(dst), *host.k_lspkd.shape[2:])
    k_lcpkd = np.zeros(shape, host.k_lspkd.dtype)
    v_lcpkd = np.zeros(shape, host.v_lspkd.dtype)
    k_lcpkd[:, : len(pairs)] = host.k_lspkd[:, slots]
    v_lcpkd[:, : len(pairs)] = host.v_lspkd[:, slots]
    # Padding rows write zeros into the null block, which holds nothing anyone reads.
    return _scatter(pages, dst, k_lcpkd, v_lcpkd)
