"""Request → block table: allocation as tokens grow, prefix caching, fork with copy-on-write.

A sequence's block table covers its computed tokens plus the tokens being computed this
step, ``block_size`` tokens a block, in order. With prefix caching, every *full* block whose
K/V have been computed is registered under a hash chain, ``h_i = sha256(h_{i-1} ‖ tokens of
block i)``, so a later sequence with the same first ``i+1`` blocks of tokens reuses them
(reference counts, no copy). A hit never covers a sequence's last token: at least one token
is computed, to produce the logits to sample from.

Blocks are registered only *after* the step that computed them (``cache_blocks``), so a hit
never points at K/V still being written, whatever order the runner writes and attends in.

Forked sequences (``n > 1``) share all their blocks. Full blocks are never written again;
the one partially filled block is copied (copy-on-write) the first time a sequence writes
into it while another still holds it. The (src, dst) pairs wait in ``take_copies()``.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from ligerjax.engine.block_pool import BlockPool
from ligerjax.engine.request import Request

log = logging.getLogger(__name__)

_ROOT_HASH = hashlib.sha256(b"ligerjax-kv-root").digest()


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Hash of a full block given its parent's hash (None for the first block)."""
    h = hashlib.sha256(_ROOT_HASH if parent_hash is None else parent_hash)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ComputedBlocks:
    """The longest cached prefix of a sequence: its blocks and how many tokens they hold."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


NO_COMPUTED_BLOCKS = ComputedBlocks()


@dataclass(frozen=True)
class PrefixCacheStats:
    """Tokens looked up at admission and tokens found cached."""

    num_queried_tokens: int
    num_hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class KVCacheManager:
    """Block tables of live sequences on top of a :class:`BlockPool`."""

    def __init__(
        self, block_pool: BlockPool, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}: must be an int >= 1")
        self.pool = block_pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading full blocks already hashed
        self._copies: list[tuple[int, int]] = []
        self._queried_tokens = 0
        self._hit_tokens = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the sequence's block table (empty if it holds no blocks)."""
        return list(self._tables.get(request_id, ()))

    def holds_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queried_tokens, self._hit_tokens)

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest run of cached full blocks at the start of a sequence with nothing
        computed yet, leaving at least its last token to compute. Changes nothing."""
        if not self.enable_prefix_caching or request.num_computed_tokens:
            return NO_COMPUTED_BLOCKS
        self.update_block_hashes(request)
        limit = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:limit]:
            block_id = self.pool.cached_block(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return ComputedBlocks(tuple(hits), len(hits) * self.block_size)

    def num_blocks_to_allocate(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks = NO_COMPUTED_BLOCKS
    ) -> int:
        """Free blocks ``allocate_slots`` would take: new blocks, a copy-on-write block, and
        cached hits that sit in the free queue."""
        table = self._tables.get(request.request_id, [])
        start = request.num_computed_tokens + computed.num_tokens
        owned = len(table) + len(computed.block_ids)
        new = max(0, cdiv(start + num_new_tokens, self.block_size) - owned)
        cow = int(self._shared_block_index(table, start, num_new_tokens) is not None)
        revived = sum(1 for b in computed.block_ids if self.pool.ref_count(b) == 0)
        return new + cow + revived

    # -- changes ---------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` tokens after the computed ones; returns the newly
        allocated block ids (a copy-on-write block first), or None, having changed nothing,
        when too few blocks are free.

        ``computed`` (from ``get_computed_blocks``, only for a sequence holding no blocks)
        marks an admission: its hit blocks join the table and the lookup counts in the
        prefix-cache statistics.
        """
        if num_new_tokens < 1:
            raise ValueError(f"allocate_slots(num_new_tokens={num_new_tokens}): must be >= 1")
        hits = computed or NO_COMPUTED_BLOCKS
        if hits.block_ids and request.request_id in self._tables:
            raise ValueError(f"request {request.request_id!r} already holds blocks")
        if self.num_blocks_to_allocate(request, num_new_tokens, hits) > self.pool.num_free_blocks:
            return None
        table = self._tables.setdefault(request.request_id, [])
        if computed is not None:
            self._record_lookup(request, hits)
        self.pool.touch(hits.block_ids)
        table.extend(hits.block_ids)
        start = request.num_computed_tokens + hits.num_tokens
        shared = self._shared_block_index(table, start, num_new_tokens)
        copied = [] if shared is None else [self._copy_on_write(table, shared)]
        new_blocks = self.pool.allocate(
            max(0, cdiv(start + num_new_tokens, self.block_size) - len(table))
        )
        table.extend(new_blocks)
        return copied + new_blocks

    def cache_blocks(self, request: Request) -> None:
        """Register the sequence's full, computed blocks in the prefix cache (call after the
        step that computed them)."""
        if not self.enable_prefix_caching or request.request_id not in self._tables:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        self.update_block_hashes(request)
        table = self._tables[request.request_id]
        for i in range(start, num_full):
            self.pool.cache_block(table[i], request.block_hashes[i])
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the sequence's references to its blocks (tail blocks become the first evicted)."""
        table = self._tables.pop(request.request_id, [])
        self._num_registered.pop(request.request_id, None)
        if self._copies and table:  # a copy into a block nobody holds any more is moot
            mine = set(table)
            self._copies = [(s, d) for s, d in self._copies if d not in mine]
        self.pool.free(table)

    def fork(self, parent: Request, child: Request) -> None:
        """Give ``child`` the parent's block table, sharing every block by reference count.

        Call before either sequence appends a token of its own.
        """
        if child.request_id in self._tables:
            raise ValueError(f"fork: {child.request_id!r} already holds blocks")
        table = list(self._tables.get(parent.request_id, ()))
        self.pool.touch(table)
        self._tables[child.request_id] = table
        self._num_registered[child.request_id] = self._num_registered.get(parent.request_id, 0)
        child.block_hashes = parent.block_hashes[: parent.num_tokens // self.block_size]

    def swap_out(self, request: Request) -> list[int]:
        """Free the sequence's blocks; returns those holding its computed tokens (table order),
        which the runner copies to host before anything else this step."""
        table = self._tables.get(request.request_id, [])
        held = table[: cdiv(request.num_computed_tokens, self.block_size)]
        self.free(request)
        return held

    def swap_in(self, request: Request, num_blocks: int) -> list[int] | None:
        """Fresh blocks to copy a swapped sequence back into (its new table), or None."""
        if request.request_id in self._tables:
            raise ValueError(f"swap_in: {request.request_id!r} already holds blocks")
        if num_blocks > self.pool.num_free_blocks:
            return None
        table = self.pool.allocate(num_blocks)
        self._tables[request.request_id] = table
        return list(table)

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write (src, dst) block pairs decided since the last call."""
        copies, self._copies = self._copies, []
        return copies

    def update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` over all its full blocks of tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, request.token_ids(i * bs, (i + 1) * bs)))

    # -- helpers ---------------------------------------------------------------------------

    def _shared_block_index(self, table: list[int], start: int, num_new_tokens: int) -> int | None:
        """Index of the block the first new token lands in, if it exists and is shared."""
        i = start // self.block_size
        if num_new_tokens > 0 and i < len(table) and self.pool.ref_count(table[i]) > 1:
            return i
        return None

    def _copy_on_write(self, table: list[int], i: int) -> int:
        """Give the table a private copy of its shared block ``i``; returns the copy."""
        (dst,) = self.pool.allocate(1)
        src = table[i]
        self._copies.append((src, dst))
        table[i] = dst
        self.pool.free([src])
        log.debug("copy-on-write block %d -> %d", src, dst)
        return dst

    def _record_lookup(self, request: Request, hits: ComputedBlocks) -> None:
        self._queried_tokens += request.num_tokens
        self._hit_tokens += hits.num_tokens
        self._num_registered[request.request_id] = len(hits.block_ids)
