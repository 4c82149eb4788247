"""The pure-JAX blockwise fallbacks (what the CPU runs): exact against the references, and
O(S) compiled temp memory where jax.nn.dot_product_attention needs O(S²)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.kernels import (
    flash_attention_reference,
    paged_attention_reference,
    ragged_paged_attention_reference,
)
from ligerjax.kernels.fallback import (
    blockwise_attention,
    blockwise_paged_attention,
    blockwise_ragged_paged_attention,
    ragged_work_items,
)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_blockwise_attention_is_exact(rng, dtype, group, causal):
    B, T, S, K, D = 3, 45, 77, 2 if group < 8 else 1, 16
    H = K * group
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    pos = jnp.asarray(np.stack([S - T + np.arange(T), np.arange(T) - 2, np.arange(T)]), jnp.int32)
    lens = jnp.asarray([S, 30, 0], jnp.int32)
    out = blockwise_attention(
        q, k, v, pos, lens, causal=causal, sm_scale=0.3, block_q=16, block_k=32
    )
    ref = flash_attention_reference(
        q, k, v, causal=causal, sm_scale=0.3, q_positions=pos, kv_lengths=lens
    )
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert not np.asarray(out[2]).any()  # empty context


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_blockwise_paged_attention_is_exact(rng, dtype, group):
    B, M, P, K, D = 4, 5, 4, 2 if group < 8 else 1, 16
    H, N = K * group, 30
    tables = np.zeros((B, M), np.int32)
    lens = np.array([0, 1, 9, M * P], np.int32)
    pool = rng.permutation(np.arange(1, N))
    for b, n in enumerate(lens):
        tables[b, : -(-n // P)] = pool[b * M : b * M + -(-n // P)]
    k_pages = jnp.asarray(rng.standard_normal((N, P, K, D)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((N, P, K, D)), dtype)
    q = jnp.asarray(rng.standard_normal((B, H, D)), dtype)
    args = (q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(lens))
    out = blockwise_paged_attention(*args, sm_scale=0.5, decode_keys=8)
    assert rel_err(out, paged_attention_reference(*args, sm_scale=0.5)) < TOL[dtype]
    assert not np.asarray(out[0]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_q", [1, 4, None], ids=["decode-path", "tiles-of-4", "default"])
def test_blockwise_ragged_paged_attention_is_exact(rng, dtype, block_q):
    mix = [(13, 13), (9, 40), (1, 17), (0, 5), (1, 1)]
    P, M, H, K, D = 8, 5, 6, 2, 16
    B, N = len(mix), 40
    tables = np.zeros((B, M), np.int32)
    pool = rng.permutation(np.arange(1, N))
    for b, (_, ctx) in enumerate(mix):
        tables[b, : -(-ctx // P)] = pool[b * M : b * M + -(-ctx // P)]
    cu = np.concatenate([[0], np.cumsum([n for n, _ in mix])]).astype(np.int32)
    T = int(cu[-1]) + 2
    args = (
        jnp.asarray(rng.standard_normal((T, H, D)), dtype),
        jnp.asarray(rng.standard_normal((N, P, K, D)), dtype),
        jnp.asarray(rng.standard_normal((N, P, K, D)), dtype),
        jnp.asarray(tables),
        jnp.asarray([c for _, c in mix], jnp.int32),
        jnp.asarray(cu),
    )
    out = blockwise_ragged_paged_attention(
        *args, sm_scale=0.4, block_q=block_q, block_k=16, decode_keys=16
    )
    ref = ragged_paged_attention_reference(*args, sm_scale=0.4)
    assert rel_err(out, ref) < TOL[dtype]
    assert not np.asarray(out[int(cu[-1]) :]).any()


def test_work_items_cover_every_token_once():
    cu = jnp.asarray([0, 5, 5, 6, 20], jnp.int32)
    seq, start = ragged_work_items(cu, 22, 4)
    covered = []
    for s, t in zip(np.asarray(seq), np.asarray(start), strict=True):
        end = int(cu[s + 1])
        covered += [(int(s), i) for i in range(int(t), min(int(t) + 4, end))]
    expected = [(b, i) for b in range(4) for i in range(int(cu[b]), int(cu[b + 1]))]
    assert sorted(covered) == expected


def _temp_bytes(fn, S: int) -> int:
    B, H, K, D = 1, 2, 1, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((B, S, H, D), jnp.float32), sd((B, S, K, D), jnp.float32))
    compiled = jax.jit(lambda q, k: fn(q, k, k, S)).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _fallback(q, k, v, S):
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (1, S))
    return blockwise_attention(
        q, k, v, pos, jnp.full((1,), S, jnp.int32), causal=True, sm_scale=0.125
    )


def _dpa(q, k, v, S):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def test_fallback_temp_memory_is_linear_and_30x_below_dot_product_attention():
    fb_4k, fb_8k = _temp_bytes(_fallback, 4096), _temp_bytes(_fallback, 8192)
    dpa_4k, dpa_8k = _temp_bytes(_dpa, 4096), _temp_bytes(_dpa, 8192)
    assert dpa_8k > 3.5 * dpa_4k  # quadratic
    assert fb_8k < 2.2 * fb_4k  # linear (or better)
    assert 30 * fb_8k < dpa_8k
