"""Pallas ragged paged attention (mixed prefill chunks and decodes in one call) against our
reference and, per sequence, jax.nn.dot_product_attention and flash_attention_reference on the
gathered dense K/V. Interpret mode here, compiled on a GPU when one is present."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.kernels import (
    flash_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from ligerjax.kernels.block_sizes import PAGED_ATTENTION
from ligerjax.kernels.paged_attention import gather_pages

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="gpu", marks=pytest.mark.gpu)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]

# (new tokens, context incl. them): a whole prompt, a chunk after a cached prefix, a decode,
# an idle sequence, a first decode token (context 1), a chunk crossing several pages.
MIX = [(13, 13), (9, 40), (1, 17), (0, 5), (1, 1), (20, 33)]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def mixed_batch(rng, mix, *, page_size, max_blocks, heads, kv_heads, head_dim, dtype, pad=3):
    B = len(mix)
    q_lens = np.array([n for n, _ in mix])
    lens = np.array([c for _, c in mix], np.int32)
    N = 1 + B * max_blocks + 4
    pool = rng.permutation(np.arange(1, N))  # shuffled, with spare blocks (holes)
    tables = np.zeros((B, max_blocks), np.int32)
    used = 0
    for b, ctx in enumerate(lens):
        n = -(-int(ctx) // page_size)
        tables[b, :n] = pool[used : used + n]
        used += n
    T = int(q_lens.sum()) + pad  # padding tokens at the end
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    shape = (N, page_size, kv_heads, head_dim)
    return (
        jnp.asarray(rng.standard_normal((T, heads, head_dim)), dtype),
        jnp.asarray(rng.standard_normal(shape), dtype),
        jnp.asarray(rng.standard_normal(shape), dtype),
        jnp.asarray(tables),
        jnp.asarray(lens),
        jnp.asarray(cu),
    )


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_mixed_batch_matches_references(rng, interpret, dtype, group):
    P, M, K, D = 8, 6, 2 if group < 8 else 1, 16
    H = K * group
    q, k_pages, v_pages, tables, lens, cu = mixed_batch(
        rng, MIX, page_size=P, max_blocks=M, heads=H, kv_heads=K, head_dim=D, dtype=dtype
    )
    block_q = max(1, 16 // (1 << (group - 1).bit_length()))
    out = ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        tables,
        lens,
        cu,
        block_q=block_q,
        pages_per_block=2,
        interpret=interpret,
    )
    assert out.shape == q.shape and out.dtype == dtype
    ref = ragged_paged_attention_reference(q, k_pages, v_pages, tables, lens, cu)
    assert rel_err(out, ref) < TOL[dtype]
    assert not np.asarray(out[int(cu[-1]) :]).any()  # padding tokens: 0

    k_bskd = gather_pages(k_pages, tables).astype(jnp.float32)
    v_bskd = gather_pages(v_pages, tables).astype(jnp.float32)
    for b, (n, ctx) in enumerate(MIX):
        if n == 0:
            continue
        q_b = q[None, int(cu[b]) : int(cu[b + 1])].astype(jnp.float32)
        k_b, v_b = k_bskd[b : b + 1, :ctx], v_bskd[b : b + 1, :ctx]
        mine = flash_attention_reference(q_b, k_b, v_b)  # the last n of ctx tokens, causal
        mask = jnp.arange(ctx)[None, :] <= (ctx - n + jnp.arange(n))[:, None]
        dpa = jax.nn.dot_product_attention(q_b, k_b, v_b, mask=mask[None, None])
        got = out[int(cu[b]) : int(cu[b + 1])][None]
        assert rel_err(got, mine) < TOL[dtype], b
        assert rel_err(got, dpa) < TOL[dtype], b


@pytest.mark.parametrize("interpret", MODES)
def test_decode_only_and_single_prefill_batches(rng, interpret):
    P, M, H, K, D = 16, 4, 4, 2, 16
    for mix in ([(1, 7), (1, 64), (1, 1), (1, 30)], [(50, 50)]):
        q, k_pages, v_pages, tables, lens, cu = mixed_batch(
            rng,
            mix,
            page_size=P,
            max_blocks=M,
            heads=H,
            kv_heads=K,
            head_dim=D,
            pad=0,
            dtype=jnp.float32,
        )
        out = ragged_paged_attention(q, k_pages, v_pages, tables, lens, cu, interpret=interpret)
        ref = ragged_paged_attention_reference(q, k_pages, v_pages, tables, lens, cu)
        assert rel_err(out, ref) < 1e-5, mix


@pytest.mark.parametrize("head_dim", sorted(PAGED_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_triton_lowering_of_the_shipped_tiles(head_dim, dtype, group):
    sd = jax.ShapeDtypeStruct
    T, B, N, P, K, M = 512, 16, 512, 16, 2, 64

    def f(*args):
        return ragged_paged_attention(*args, interpret=False)

    lowered = (
        jax.jit(f)
        .trace(
            sd((T, K * group, head_dim), dtype),
            sd((N, P, K, head_dim), dtype),
            sd((N, P, K, head_dim), dtype),
            sd((B, M), jnp.int32),
            sd((B,), jnp.int32),
            sd((B + 1,), jnp.int32),
        )
        .lower(lowering_platforms=("cuda",))
    )
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def _call(**kw):
    args = {
        "q": jnp.zeros((6, 4, 16)),
        "k_pages": jnp.zeros((5, 8, 2, 16)),
        "v_pages": jnp.zeros((5, 8, 2, 16)),
        "block_tables": jnp.asarray([[1, 2], [3, 0]], jnp.int32),
        "context_lens": jnp.asarray([10, 3], jnp.int32),
        "cu_q_lens": jnp.asarray([0, 4, 5], jnp.int32),
    }
    args.update(kw)
    return ragged_paged_attention(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cu_q_lens": jnp.asarray([0, 4], jnp.int32)}, r"cu_q_lens has shape"),
        ({"cu_q_lens": jnp.asarray([0, 4, 3], jnp.int32)}, r"cu_q_lens=\[0, 4, 3\]"),
        ({"cu_q_lens": jnp.asarray([1, 4, 5], jnp.int32)}, r"cu_q_lens=\[1, 4, 5\]"),
        ({"cu_q_lens": jnp.asarray([0, 4, 7], jnp.int32)}, r"end <= T=6"),
        ({"cu_q_lens": jnp.asarray([0, 4.0, 5])}, r"cu_q_lens has dtype"),
        ({"context_lens": jnp.asarray([3, 3], jnp.int32)}, r"context_lens=\[3, 3\]"),
        ({"block_tables": jnp.asarray([[1, 9], [3, 0]], jnp.int32)}, r"block_tables\[0, 1\]=9"),
        ({"q": jnp.zeros((6, 3, 16))}, r"k_pages has 2 KV heads"),
        ({"q": jnp.zeros((6, 4, 16), jnp.bfloat16)}, r"k_pages dtype differs"),
        ({"block_q": 2}, r"block_q=2"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)
