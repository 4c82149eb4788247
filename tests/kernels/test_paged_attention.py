"""Pallas paged (decode) attention against our reference, JAX's paged_attention_reference and
jax.nn.dot_product_attention: shuffled block tables with holes, empty and length-1 contexts,
GQA, context splits, f32/bf16. Interpret mode here, compiled on a GPU when one is present."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu.paged_attention import (
    paged_attention_reference as jax_paged_attention_reference,
)

from ligerjax.kernels import paged_attention, paged_attention_reference
from ligerjax.kernels.block_sizes import PAGED_ATTENTION
from ligerjax.kernels.paged_attention import gather_pages

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="gpu", marks=pytest.mark.gpu)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def paged_cache(rng, context_lens, *, max_blocks, page_size, kv_heads, head_dim, dtype, spare=5):
    """Random pages; each sequence's blocks drawn in shuffled order from a pool with unused
    blocks in between (holes); table entries past the context point at the null block 0."""
    B = len(context_lens)
    N = 1 + B * max_blocks + spare
    pool = rng.permutation(np.arange(1, N))
    tables = np.zeros((B, max_blocks), np.int32)
    used = 0
    for b, n in enumerate(context_lens):
        blocks = -(-n // page_size)
        tables[b, :blocks] = pool[used : used + blocks]
        used += blocks
    shape = (N, page_size, kv_heads, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    return k_pages, v_pages, jnp.asarray(tables), jnp.asarray(context_lens, jnp.int32)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_gqa_decode_matches_references(rng, interpret, dtype, group):
    P, M, K, D = 8, 6, 2 if group < 8 else 1, 32
    H = K * group
    lens = [0, 1, P, 13, M * P]  # empty, one key, one full page, a partial page, all pages
    k_pages, v_pages, tables, lens = paged_cache(
        rng, lens, max_blocks=M, page_size=P, kv_heads=K, head_dim=D, dtype=dtype
    )
    B = tables.shape[0]
    q = jnp.asarray(rng.standard_normal((B, H, D)), dtype)
    out = paged_attention(
        q, k_pages, v_pages, tables, lens, pages_per_block=2, num_splits=2, interpret=interpret
    )
    assert out.shape == (B, H, D) and out.dtype == dtype
    assert rel_err(out, paged_attention_reference(q, k_pages, v_pages, tables, lens)) < TOL[dtype]
    assert not np.asarray(out[0]).any()  # empty context: exactly 0

    k_bskd = gather_pages(k_pages, tables).astype(jnp.float32)
    v_bskd = gather_pages(v_pages, tables).astype(jnp.float32)
    scale = D**-0.5
    theirs = jax_paged_attention_reference(q.astype(jnp.float32) * scale, k_bskd, v_bskd, lens)
    assert rel_err(out[1:], theirs[1:]) < TOL[dtype]  # theirs averages v where nothing is seen
    mask = (jnp.arange(M * P)[None, :] < lens[:, None])[:, None, None, :]
    dpa = jax.nn.dot_product_attention(
        q[1:, None].astype(jnp.float32), k_bskd[1:], v_bskd[1:], mask=mask[1:]
    )
    assert rel_err(out[1:], dpa[:, 0]) < TOL[dtype]


@pytest.mark.parametrize("interpret", MODES)
def test_context_splits_agree(rng, interpret):
    P, M, K, D, H = 4, 16, 2, 16, 4
    k_pages, v_pages, tables, lens = paged_cache(
        rng, [64, 37, 5], max_blocks=M, page_size=P, kv_heads=K, head_dim=D, dtype=jnp.float32
    )
    q = jnp.asarray(rng.standard_normal((3, H, D)), jnp.float32)
    ref = paged_attention_reference(q, k_pages, v_pages, tables, lens, sm_scale=0.7)
    for splits in (1, 3, 4, 100):
        out = paged_attention(
            q,
            k_pages,
            v_pages,
            tables,
            lens,
            sm_scale=0.7,
            pages_per_block=4,
            num_splits=splits,
            interpret=interpret,
        )
        assert rel_err(out, ref) < 1e-5, splits


@pytest.mark.parametrize("interpret", MODES)
def test_default_tiles_and_pages_bigger_than_a_tile(rng, interpret):
    P, M, K, D, H = 32, 3, 1, 16, 2
    k_pages, v_pages, tables, lens = paged_cache(
        rng, [70, 1], max_blocks=M, page_size=P, kv_heads=K, head_dim=D, dtype=jnp.float32
    )
    q = jnp.asarray(rng.standard_normal((2, H, D)), jnp.float32)
    out = paged_attention(q, k_pages, v_pages, tables, lens, interpret=interpret)
    assert rel_err(out, paged_attention_reference(q, k_pages, v_pages, tables, lens)) < 1e-5


@pytest.mark.parametrize("head_dim", sorted(PAGED_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 64])
def test_triton_lowering_of_the_shipped_tiles(head_dim, dtype, batch):
    sd = jax.ShapeDtypeStruct
    N, P, K, H, M = 512, 16, 8, 32, 128

    def f(*args):
        return paged_attention(*args, interpret=False)

    lowered = (
        jax.jit(f)
        .trace(
            sd((batch, H, head_dim), dtype),
            sd((N, P, K, head_dim), dtype),
            sd((N, P, K, head_dim), dtype),
            sd((batch, M), jnp.int32),
            sd((batch,), jnp.int32),
        )
        .lower(lowering_platforms=("cuda",))
    )
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def _call(**kw):
    args = {
        "q": jnp.zeros((2, 4, 16)),
        "k_pages": jnp.zeros((5, 8, 2, 16)),
        "v_pages": jnp.zeros((5, 8, 2, 16)),
        "block_tables": jnp.asarray([[1, 2], [3, 0]], jnp.int32),
        "context_lens": jnp.asarray([10, 3], jnp.int32),
    }
    args.update(kw)
    return paged_attention(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"q": jnp.zeros((2, 1, 4, 16))}, r"\bq has shape"),
        (
            {"k_pages": jnp.zeros((5, 8, 3, 16)), "v_pages": jnp.zeros((5, 8, 3, 16))},
            r"k_pages has 3 KV heads",
        ),
        ({"v_pages": jnp.zeros((5, 8, 2, 32))}, r"v_pages has shape"),
        ({"k_pages": jnp.zeros((5, 8, 2, 32))}, r"k_pages head dim 32"),
        ({"v_pages": jnp.zeros((5, 8, 2, 16), jnp.bfloat16)}, r"v_pages dtype differs"),
        ({"block_tables": jnp.asarray([[1, 5], [3, 0]], jnp.int32)}, r"block_tables\[0, 1\]=5"),
        ({"block_tables": jnp.asarray([[1, -1], [3, 0]], jnp.int32)}, r"block_tables\[0, 1\]=-1"),
        ({"block_tables": jnp.asarray([[1.0, 2], [3, 0]])}, r"block_tables has dtype"),
        ({"block_tables": jnp.asarray([[1, 2]], jnp.int32)}, r"block_tables has 1 rows"),
        ({"context_lens": jnp.asarray([10, 17], jnp.int32)}, r"context_lens\[1\]=17"),
        ({"context_lens": jnp.asarray([10], jnp.int32)}, r"context_lens has shape"),
        (
            {"k_pages": jnp.zeros((5, 6, 2, 16)), "v_pages": jnp.zeros((5, 6, 2, 16))},
            r"page size P=6",
        ),
        ({"q": jnp.zeros((2, 4, 16), jnp.int32)}, r"\bq has dtype int32"),
        ({"pages_per_block": 3}, r"pages_per_block=3"),
        ({"num_splits": 0}, r"num_splits=0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)
