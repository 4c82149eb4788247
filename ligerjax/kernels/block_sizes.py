"""Tuned tile sizes of the attention kernels: data, looked up by head dim (and page size).

Every entry is a power of two, as Triton needs; 2-D dots inside the kernels are at least 16
wide. The GPU numbers for head dims 64 and 128 are the best of a sweep on an H200
(``ligerjax bench attention --tune``, 2026-11-30, docs/BENCHMARKS.md) among tiles that also fit
an A100's 164 KiB of shared memory: 64x64 flash tiles with 4 warps and 3 pipeline stages ran
at 0.73-0.80 of cuDNN for D=64 and 0.65-0.73 for D=128 (the earlier 128-row tiles: 0.68-0.77
and 0.53-0.58); the paged kernels read 4 pages (64 keys) a step with 3 stages. The other head
dims keep the usual FlashAttention-2 / Triton starting points.

The CPU numbers are the tiles of the pure-JAX blockwise fallback, measured on the 2-core
development machine: big enough for efficient matrix products, small enough that the working
set (one ``[block_q, block_k]`` tile of logits per head) stays a few MiB.
"""

from __future__ import annotations

from dataclasses import dataclass


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class FlashBlockSizes:
    """Tiles of the Pallas flash-attention kernel (one program: ``block_q`` rows of one head)."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "num_warps"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(f"FlashBlockSizes.{name}={getattr(self, name)}: not a power of 2")
        if self.block_q < 16 or self.block_k < 16:
            raise ValueError(f"FlashBlockSizes: tiles {self.block_q}x{self.block_k} below 16")
        if self.num_stages < 1:
            raise ValueError(f"FlashBlockSizes.num_stages={self.num_stages}: must be >= 1")


@dataclass(frozen=True)
class PagedBlockSizes:
    """Tiles of the paged kernels: keys are read ``block_k`` at a time (whole pages).

    ``rows`` is the number of (query token, query head) rows one program of the ragged
    kernel owns; the decode kernel owns the query heads of one KV head (padded to >= 16).
    ``target_programs`` sizes the decode kernel's split over the context (flash decoding):
    enough programs to fill the card even at batch 1.
    """

    block_k: int
    rows: int
    num_warps: int
    num_stages: int
    target_programs: int

    def __post_init__(self) -> None:
        for name in ("block_k", "rows", "num_warps"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(f"PagedBlockSizes.{name}={getattr(self, name)}: not a power of 2")
        if self.rows < 16 or self.block_k < 16:
            raise ValueError(f"PagedBlockSizes: rows={self.rows}, block_k={self.block_k} below 16")

    def pages_per_block(self, page_size: int) -> int:
        """Pages read per key tile: ``block_k`` tokens, at least one page."""
        return max(1, self.block_k // page_size)


@dataclass(frozen=True)
class FallbackBlockSizes:
    """Tiles of the pure-JAX blockwise fallback (CPU)."""

    block_q: int
    block_k: int
    decode_keys: int  # keys gathered per step of the paged decode fallback
    ragged_block_q: int  # query tokens per tile of a prefill chunk in the ragged fallback
    ragged_block_k: int  # keys per step of those tiles


# Head dim -> flash tiles on the GPU (Triton). Head dims in between use the next entry up.
FLASH_ATTENTION: dict[int, FlashBlockSizes] = {
    16: FlashBlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=3),
    32: FlashBlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=3),
    64: FlashBlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3),
    128: FlashBlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3),
    256: FlashBlockSizes(block_q=64, block_k=32, num_warps=8, num_stages=2),
}

# Head dim -> paged tiles (decode and ragged). A key tile is block_k tokens, or one page when
# pages are bigger.
PAGED_ATTENTION: dict[int, PagedBlockSizes] = {
    16: PagedBlockSizes(block_k=64, rows=64, num_warps=4, num_stages=3, target_programs=264),
    32: PagedBlockSizes(block_k=64, rows=64, num_warps=4, num_stages=3, target_programs=264),
    64: PagedBlockSizes(block_k=64, rows=64, num_warps=4, num_stages=3, target_programs=264),
    128: PagedBlockSizes(block_k=64, rows=64, num_warps=4, num_stages=3, target_programs=264),
    256: PagedBlockSizes(block_k=32, rows=32, num_warps=8, num_stages=2, target_programs=264),
}

FALLBACK = FallbackBlockSizes(
    block_q=256, block_k=512, decode_keys=64, ragged_block_q=32, ragged_block_k=128
)

MAX_HEAD_DIM = max(FLASH_ATTENTION)


def flash_block_sizes(head_dim: int) -> FlashBlockSizes:
    """The flash tiles for ``head_dim`` (rounded up to a tabulated power of two)."""
    padded = max(16, next_power_of_two(head_dim))
    if padded not in FLASH_ATTENTION:
        raise ValueError(f"head_dim={head_dim}: above the largest tuned head dim {MAX_HEAD_DIM}")
    return FLASH_ATTENTION[padded]


def paged_block_sizes(head_dim: int) -> PagedBlockSizes:
    """The paged tiles for ``head_dim`` (rounded up to a tabulated power of two)."""
    padded = max(16, next_power_of_two(head_dim))
    if padded not in PAGED_ATTENTION:
        raise ValueError(f"head_dim={head_dim}: above the largest tuned head dim {MAX_HEAD_DIM}")
    return PAGED_ATTENTION[padded]
