"""Physical KV blocks: reference counts, the free queue, and the prefix cache's hash map.

Block 0 is the null block: it is never handed out, never counted, and the runner may point
padding entries of a block table at it. Every other block is either *in use* (reference
count > 0) or *free* (count 0, in the free queue). A free block may still hold a cached full
block (its hash is in the map): a prefix hit takes it back out of the queue in O(1), and
allocation evicts it only when no plain free block is left.

Eviction order (our policy): the free queue is an ordered dict, allocated from its head.
Freed blocks that hold no cached content go to the head (they are worth nothing, reuse them
first); freed cached blocks go to the tail in reverse table order, so of one sequence the
tail blocks (the least shareable) are evicted first and, across sequences, the least
recently freed first (LRU).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

NULL_BLOCK_ID = 0


class OutOfBlocksError(RuntimeError):
    """``allocate`` asked for more blocks than are free; nothing changed."""


@dataclass(frozen=True)
class BlockPoolStats:
    """A snapshot of the pool. ``num_free`` includes cached free blocks (evictable)."""

    num_blocks: int  # including the null block
    num_free: int
    num_cached: int  # blocks with a registered hash, in use or free
    num_cached_free: int
    num_evictions: int

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks in use."""
        return self.num_used / max(1, self.num_blocks - 1)


class BlockPool:
    """``num_blocks`` physical blocks (block 0 reserved), their reference counts and hashes."""

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks!r}: need an int >= 2 (block 0 is null)")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block id -> hash of its (full) content
        self._block_of: dict[bytes, int] = {}  # hash -> the one block holding it
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._num_cached_free = 0
        self._num_evictions = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        """All blocks but the null block."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks ``allocate`` can hand out now (cached free ones included: it evicts them)."""
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids in allocation order (the head is handed out first)."""
        return list(self._free)

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block holding ``block_hash``'s content, if it is cached."""
        return self._block_of.get(block_hash)

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash_of.get(block_id)

    @property
    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(
            num_blocks=self.num_blocks,
            num_free=len(self._free),
            num_cached=len(self._block_of),
            num_cached_free=self._num_cached_free,
            num_evictions=self._num_evictions,
        )

    # -- changes ---------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with reference count 1, from the head of the free queue.

        All or nothing: raises :class:`OutOfBlocksError` and changes nothing when fewer than
        ``n`` are free. A cached free block handed out loses its hash (it is evicted).
        """
        if n < 0:
            raise ValueError(f"allocate(n={n}): n must be >= 0")
        if n > len(self._free):
            raise OutOfBlocksError(f"allocate({n}): only {len(self._free)} blocks free")
        blocks = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            if block_id in self._hash_of:
                self._evict(block_id)
            self._ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference to each block (a prefix hit or a fork), taking free ones
        out of the free queue."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
                self._num_cached_free -= block_id in self._hash_of
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block of a block table (given in table order).

        Blocks reaching zero join the free queue: uncached ones at the head, cached ones at
        the tail, last table entry first. Freeing a block with no reference is a bug and
        raises ``ValueError``.
        """
        for block_id in reversed(block_ids):
            self._check_id(block_id)
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} freed with reference count 0")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._release(block_id)

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Register ``block_id`` (in use, full) as holding ``block_hash``'s content.

        False (and nothing changes) when another block already holds that content: the two
        were computed side by side; the newcomer stays private and is freed as plain.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"cache_block: block {block_id} is not in use")
        held = self._hash_of.get(block_id)
        if held is not None:
            return held == block_hash
        if block_hash in self._block_of:
            return False
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (e.g. after new weights); returns how many were dropped."""
        dropped = len(self._block_of)
        for block_id in list(self._hash_of):
            if self._ref_counts[block_id] == 0:
                self._free.move_to_end(block_id, last=False)
        self._hash_of.clear()
        self._block_of.clear()
        self._num_cached_free = 0
        return dropped

    # -- helpers ---------------------------------------------------------------------------

    def _check_id(self, block_id: int) -> None:
        if not 0 < block_id < self.num_blocks:
            what = "the null block" if block_id == NULL_BLOCK_ID else "out of range"
            raise ValueError(f"block id {block_id} is {what} (pool of {self.num_blocks})")

    def _release(self, block_id: int) -> None:
        self._free[block_id] = None  # appended at the tail
        if block_id in self._hash_of:
            self._num_cached_free += 1
        else:
            self._free.move_to_end(block_id, last=False)

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash_of.pop(block_id)
        del self._block_of[block_hash]
        self._num_cached_free -= 1
        self._num_evictions += 1
        log.debug("evicted cached block %d", block_id)
