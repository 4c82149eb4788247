"""KV pages sized from a memory budget; swap and copy moves taking the scheduler's pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.engine import kv_cache_storage as storage
from ligerjax.engine.kv_cache_storage import (
    HostKVBuffer,
    KVCacheSpec,
    KVPages,
    allocate_kv_pages,
    copy_blocks,
    num_blocks_for_budget,
    swap_in,
    swap_out,
)

SPEC = KVCacheSpec(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


def random_pages(spec: KVCacheSpec, num_blocks: int, seed: int = 0) -> KVPages:
    keys = jax.random.split(jax.random.key(seed), 2 * spec.num_layers)
    shape, dtype = spec.page_shape(num_blocks), jnp.dtype(spec.dtype)
    arrays = [jax.random.normal(k, shape).astype(dtype) for k in keys]
    return KVPages(tuple(arrays[: spec.num_layers]), tuple(arrays[spec.num_layers :]))


def host_copy(pages: KVPages) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [np.asarray(k) for k in pages.k], [np.asarray(v) for v in pages.v]


def test_blocks_for_a_memory_budget():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, bf16: 368,640 bytes a block of 16.
    assert KVCacheSpec(30, 16, 3, 64).bytes_per_block == 368_640
    assert num_blocks_for_budget(1 << 30, 30, 16, 3, 64, "bfloat16") == 2912
    assert num_blocks_for_budget(1 << 30, 30, 16, 3, 64, "float32") == 1456
    with pytest.raises(ValueError, match="memory_bytes=1000: fits 0 KV blocks"):
        num_blocks_for_budget(1000, 30, 16, 3, 64)


@pytest.mark.parametrize(
    ("field", "value"), [("num_layers", 0), ("block_size", -1), ("head_dim", 1.5), ("dtype", "x")]
)
def test_spec_validation_names_the_value(field, value):
    fields = {"num_layers": 2, "block_size": 4, "num_kv_heads": 2, "head_dim": 8} | {field: value}
    with pytest.raises(ValueError, match=f"KVCacheSpec.{field}={value!r}"):
        KVCacheSpec(**fields)


def test_allocated_pages_have_one_n_p_k_d_array_per_layer():
    pages = allocate_kv_pages(SPEC, 6)
    assert len(pages.k) == len(pages.v) == 2 and pages.num_blocks == 6
    assert all(x.shape == (6, 4, 2, 8) and x.dtype == jnp.float32 for x in pages.k + pages.v)
    assert not any(bool(x.any()) for x in pages.k + pages.v)


def test_copy_blocks_reads_every_source_before_writing():
    pages = random_pages(SPEC, 8)
    k0, v0 = host_copy(pages)
    pages = copy_blocks(pages, [(1, 3), (3, 5), (2, 6)])  # 3 is both written and read
    k1, v1 = host_copy(pages)
    for before, after in ((k0, k1), (v0, v1)):
        for layer in range(2):
            expect = before[layer].copy()
            expect[[3, 5, 6]] = before[layer][[1, 3, 2]]
            np.testing.assert_array_equal(after[layer], expect)


def test_swap_out_then_in_restores_the_blocks_elsewhere():
    spec = KVCacheSpec(2, 4, 2, 8, "bfloat16")
    pages = random_pages(spec, 8, seed=1)
    k0, v0 = host_copy(pages)
    host = HostKVBuffer.allocate(spec, 4)
    swap_out(pages, host, [(2, 3), (5, 0)])
    np.testing.assert_array_equal(host.k_lspkd[:, 3], np.stack([k[2] for k in k0]))
    np.testing.assert_array_equal(host.v_lspkd[:, 0], np.stack([v[5] for v in v0]))
    pages = swap_in(pages, host, [(3, 6), (0, 7), (3, 1)])
    k1, v1 = host_copy(pages)
    for layer in range(2):
        for dst, src in ((6, 2), (7, 5), (1, 2)):
            np.testing.assert_array_equal(k1[layer][dst], k0[layer][src])
            np.testing.assert_array_equal(v1[layer][dst], v0[layer][src])
        for untouched in (2, 3, 4, 5):
            np.testing.assert_array_equal(k1[layer][untouched], k0[layer][untouched])


def test_no_pairs_is_a_no_op_and_pair_counts_share_a_bucketed_program():
    pages = random_pages(SPEC, 8)
    assert copy_blocks(pages, []) is pages
    pages = copy_blocks(pages, [(1, 2), (3, 4), (5, 6)])
    size = storage._copy._cache_size()
    pages = copy_blocks(pages, [(1, 2), (3, 4), (5, 6), (1, 7)])  # 3 and 4 pad to 4 pairs
    assert storage._copy._cache_size() == size
