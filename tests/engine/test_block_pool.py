"""BlockPool: null block, all-or-nothing allocation, reference counts, eviction order."""

from __future__ import annotations

import pytest

from ligerjax.engine.block_pool import BlockPool, OutOfBlocksError


def h(name: str) -> bytes:
    return name.encode()


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    assert pool.allocate(4) == [1, 2, 3, 4]
    assert pool.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)


def test_failed_allocation_changes_nothing():
    pool = BlockPool(4)
    assert pool.allocate(2) == [1, 2]
    before = (pool.free_queue(), [pool.ref_count(b) for b in range(4)], pool.stats)
    with pytest.raises(OutOfBlocksError, match="only 1 blocks free"):
        pool.allocate(2)
    assert (pool.free_queue(), [pool.ref_count(b) for b in range(4)], pool.stats) == before
    assert pool.allocate(1) == [3]


def test_reference_counts_follow_touch_and_free():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.touch(a)
    assert [pool.ref_count(b) for b in a] == [2, 2]
    pool.free(a)
    assert [pool.ref_count(b) for b in a] == [1, 1]
    assert pool.free_queue() == [3]
    pool.free(a)
    assert pool.num_free_blocks == 3
    assert pool.stats.num_used == 0


def test_double_free_and_null_block_are_refused():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match=f"block {b} freed with reference count 0"):
        pool.free([b])
    with pytest.raises(ValueError, match="block id 0 is the null block"):
        pool.free([0])
    with pytest.raises(ValueError, match="block id 0 is the null block"):
        pool.touch([0])
    with pytest.raises(ValueError, match="block id 9 is out of range"):
        pool.touch([9])


def test_eviction_order_plain_blocks_first_then_sequence_tails_lru():
    pool = BlockPool(10)
    a = pool.allocate(4)  # a sequence: three full cached blocks and a partial one
    for block, name in zip(a[:3], ["a0", "a1", "a2"], strict=True):
        assert pool.cache_block(block, h(name))
    b = pool.allocate(2)  # b: one full cached block, one partial
    assert pool.cache_block(b[0], h("b0"))
    assert (a, b) == ([1, 2, 3, 4], [5, 6])

    pool.free(a)
    assert pool.free_queue() == [4, 7, 8, 9, 3, 2, 1]
    pool.free(b)
    assert pool.free_queue() == [6, 4, 7, 8, 9, 3, 2, 1, 5]
    assert pool.stats.num_cached_free == 4

    assert pool.allocate(7) == [6, 4, 7, 8, 9, 3, 2]  # a's tail blocks are evicted first
    assert pool.stats.num_evictions == 2
    assert pool.cached_block(h("a2")) is None and pool.cached_block(h("a1")) is None
    assert pool.cached_block(h("a0")) == 1 and pool.cached_block(h("b0")) == 5
    assert pool.block_hash(3) is None


def test_touch_takes_a_cached_free_block_out_of_the_middle_of_the_queue():
    pool = BlockPool(6)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache_block(block, h(f"x{i}"))
    pool.free(blocks)
    assert pool.free_queue() == [4, 5, 3, 2, 1]
    pool.touch([pool.cached_block(h("x1"))])  # a prefix hit on block 2
    assert pool.ref_count(2) == 1
    assert pool.free_queue() == [4, 5, 3, 1]
    assert pool.stats.num_cached_free == 2
    assert pool.allocate(4) == [4, 5, 3, 1]
    assert pool.cached_block(h("x1")) == 2


def test_duplicate_content_keeps_the_first_block_cached():
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    assert pool.cache_block(first, h("same"))
    assert not pool.cache_block(second, h("same"))
    assert pool.cached_block(h("same")) == first
    assert pool.block_hash(second) is None
    pool.free([first, second])
    assert pool.free_queue() == [2, 3, 1]  # the uncached duplicate is reused first


def test_cache_block_needs_a_block_in_use():
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="block 1 is not in use"):
        pool.cache_block(1, h("x"))


def test_reset_prefix_cache_forgets_hashes_and_frees_them_first():
    pool = BlockPool(5)
    blocks = pool.allocate(2)
    pool.cache_block(blocks[0], h("p"))
    pool.free(blocks)
    assert pool.free_queue() == [2, 3, 4, 1]
    assert pool.reset_prefix_cache() == 1
    assert pool.cached_block(h("p")) is None
    assert pool.free_queue() == [1, 2, 3, 4]
    assert pool.stats.num_cached_free == 0


def test_pool_needs_two_blocks():
    with pytest.raises(ValueError, match="num_blocks=1"):
        BlockPool(1)
