"""KVCacheManager: prefix-hit lengths, shared reference counts, fork with copy-on-write."""

from __future__ import annotations

import pytest

from ligerjax.engine.block_pool import BlockPool
from ligerjax.engine.kv_cache_manager import ComputedBlocks, KVCacheManager, hash_block
from ligerjax.engine.request import Request
from ligerjax.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int = 16, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), BS, enable_prefix_caching=caching)


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, r: Request) -> list[int]:
    """Admit ``r`` as the scheduler does and mark its whole prompt computed."""
    computed = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - computed.num_tokens, computed) is not None
    r.num_computed_tokens = r.num_tokens
    kv.cache_blocks(r)
    return kv.block_table(r.request_id)


def refs(kv: KVCacheManager) -> list[int]:
    return [kv.pool.ref_count(b) for b in range(kv.pool.num_blocks)]


def test_hash_chain_is_stable_and_depends_on_the_parent():
    h0 = hash_block(None, [1, 2, 3, 4])
    assert h0 == hash_block(None, (1, 2, 3, 4))
    assert hash_block(h0, [5, 6, 7, 8]) == hash_block(h0, [5, 6, 7, 8])
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert len(h0) == 32


def test_prefix_hit_shares_blocks_and_counts_refs():
    kv = make()
    a = req("a", list(range(10)))
    assert admit(kv, a) == [1, 2, 3]
    b = req("b", [*range(8), 50, 51, 52])  # same first two blocks, then differs
    computed = kv.get_computed_blocks(b)
    assert computed == ComputedBlocks((1, 2), 8)
    assert kv.allocate_slots(b, 3, computed) == [4]
    assert kv.block_table("b") == [1, 2, 4]
    assert refs(kv)[:5] == [0, 2, 2, 1, 1]
    stats = kv.prefix_cache_stats
    assert (stats.num_queried_tokens, stats.num_hit_tokens) == (21, 8)
    assert stats.hit_rate == pytest.approx(8 / 21)


def test_hit_never_covers_the_last_token():
    kv = make()
    admit(kv, req("a", list(range(12))))  # three full cached blocks
    same = req("same", list(range(12)))
    assert kv.get_computed_blocks(same) == ComputedBlocks((1, 2), 8)  # token 11 is computed
    shorter = req("shorter", list(range(8)))
    assert kv.get_computed_blocks(shorter) == ComputedBlocks((1,), 4)
    assert kv.get_computed_blocks(req("one", list(range(4)))) == ComputedBlocks()


def test_hit_stops_at_the_first_divergent_block_of_the_chain():
    kv = make()
    admit(kv, req("a", list(range(13))))
    other = req("other", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])  # block 2 equal, 1 not
    assert kv.get_computed_blocks(other) == ComputedBlocks((1,), 4)


def test_partial_blocks_are_never_cached():
    kv = make()
    admit(kv, req("a", list(range(6))))
    assert kv.pool.stats.num_cached == 1
    assert kv.get_computed_blocks(req("b", [*range(6), 7, 8, 9])) == ComputedBlocks((1,), 4)


def test_freed_cached_blocks_are_revived_by_a_hit_and_tails_evicted_first():
    kv = make(num_blocks=8)
    a = req("a", list(range(13)))
    assert admit(kv, a) == [1, 2, 3, 4]
    kv.free(a)
    assert kv.pool.free_queue() == [4, 5, 6, 7, 3, 2, 1]
    assert sorted(kv.pool.allocate(6)) == [2, 3, 4, 5, 6, 7]  # evicts a's blocks 3 then 2
    again = req("again", list(range(13)))
    assert kv.get_computed_blocks(again) == ComputedBlocks((1,), 4)


def test_revived_hits_count_against_free_blocks():
    kv = make(num_blocks=5)
    a = req("a", list(range(9)))
    assert admit(kv, a) == [1, 2, 3]
    kv.free(a)  # 1 and 2 cached and free, 3 plain and free, 4 free
    b = req("b", list(range(9)))
    computed = kv.get_computed_blocks(b)
    assert computed == ComputedBlocks((1, 2), 8)
    assert kv.num_blocks_to_allocate(b, 1, computed) == 3  # one new block, two revived
    assert kv.allocate_slots(b, 1, computed) == [3]
    assert kv.pool.free_queue() == [4]


def test_failed_allocation_leaks_nothing():
    kv = make(num_blocks=6)
    a = req("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    hog = kv.pool.allocate(2)  # leaves the two cached blocks and one plain block free
    b = req("b", [*range(8), *range(100, 110)])  # hits two blocks, needs three new
    computed = kv.get_computed_blocks(b)
    assert computed.block_ids == (1, 2)
    before = (refs(kv), kv.pool.free_queue(), kv.pool.stats, kv.prefix_cache_stats)
    assert kv.allocate_slots(b, 10, computed) is None
    assert (refs(kv), kv.pool.free_queue(), kv.pool.stats, kv.prefix_cache_stats) == before
    assert not kv.holds_blocks("b")
    kv.pool.free(hog)
    assert kv.allocate_slots(b, 10, computed) == [3, 4, 5]


def test_tokens_grow_into_new_blocks_only_at_block_boundaries():
    kv = make()
    r = req("r", list(range(3)))
    assert kv.allocate_slots(r, 3) == [1]
    r.num_computed_tokens = 3
    assert kv.allocate_slots(r, 1) == []  # position 3 fits block 1
    r.num_computed_tokens = 4
    assert kv.allocate_slots(r, 5) == [2, 3]  # positions 4..8
    assert kv.block_table("r") == [1, 2, 3]


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    kv = make()
    parent = req("p", list(range(6)))
    assert admit(kv, parent) == [1, 2]
    child = parent.fork(1)
    kv.fork(parent, child)
    assert kv.block_table("p#1") == [1, 2]
    assert refs(kv)[:3] == [0, 2, 2]
    parent.append_output(100)
    child.append_output(200)

    assert kv.allocate_slots(parent, 1) == [3]  # position 6 lands in shared block 2
    assert kv.block_table("p") == [1, 3]
    assert kv.take_copies() == [(2, 3)]
    assert refs(kv)[:4] == [0, 2, 1, 1]
    assert kv.allocate_slots(child, 1) == []  # block 2 is the child's alone now: no copy
    assert kv.block_table("p#1") == [1, 2]
    assert kv.take_copies() == []


def test_fork_at_a_block_boundary_copies_nothing():
    kv = make()
    parent = req("p", list(range(8)))
    admit(kv, parent)
    child = parent.fork(1)
    kv.fork(parent, child)
    assert child.block_hashes == parent.block_hashes[:2]
    assert kv.allocate_slots(parent, 1) == [3]
    assert kv.allocate_slots(child, 1) == [4]
    assert kv.take_copies() == []
    assert refs(kv)[:5] == [0, 2, 2, 1, 1]


def test_copy_on_write_needs_a_free_block_or_changes_nothing():
    kv = make(num_blocks=3)
    parent = req("p", list(range(6)))
    admit(kv, parent)
    child = parent.fork(1)
    kv.fork(parent, child)
    parent.append_output(1)
    assert kv.allocate_slots(parent, 1) is None
    assert kv.take_copies() == []
    assert kv.block_table("p") == [1, 2] and refs(kv) == [0, 2, 2]


def test_freeing_a_sequence_drops_its_pending_copy():
    kv = make()
    parent = req("p", list(range(6)))
    admit(kv, parent)
    child = parent.fork(1)
    kv.fork(parent, child)
    parent.append_output(1)
    kv.allocate_slots(parent, 1)
    kv.free(parent)
    assert kv.take_copies() == []
    kv.free(child)
    assert kv.pool.num_free_blocks == 15


def test_swap_out_frees_blocks_and_swap_in_gives_fresh_ones():
    kv = make(num_blocks=6)
    r = req("r", list(range(6)))
    assert admit(kv, r) == [1, 2]
    assert kv.swap_out(r) == [1, 2]
    assert not kv.holds_blocks("r") and kv.pool.num_free_blocks == 5
    assert kv.pool.allocate(1) == [2]  # the plain partial block is reused first
    assert kv.swap_in(r, 2) == [3, 4]
    assert kv.block_table("r") == [3, 4]
    assert kv.swap_in(req("big", [1]), 5) is None


def test_no_hits_without_prefix_caching():
    kv = make(caching=False)
    admit(kv, req("a", list(range(12))))
    assert kv.pool.stats.num_cached == 0
    assert kv.get_computed_blocks(req("b", list(range(12)))) == ComputedBlocks()
