"""The KV page writer: exact scatter by slot mapping, padding slots skipped, donation, bad
arguments; and with ragged paged attention it reproduces dense causal attention step by step."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.kernels import (
    flash_attention_reference,
    ragged_paged_attention,
    write_kv_pages,
    write_kv_pages_reference,
)
from ligerjax.kernels.kv_writer import slot_mapping_for


def pages(rng, N=6, P=4, K=2, D=8, dtype=jnp.float32):
    return (
        jnp.asarray(rng.standard_normal((N, P, K, D)), dtype),
        jnp.asarray(rng.standard_normal((N, P, K, D)), dtype),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("donate", [False, True])
def test_writes_every_token_at_its_slot_and_skips_padding(rng, dtype, donate):
    k_pages, v_pages = pages(rng, dtype=dtype)
    N, P, K, D = k_pages.shape
    T = 9
    slots = rng.choice(np.arange(N * P), size=T, replace=False).astype(np.int32)
    slots[[2, 7]] = [-1, N * P]  # padding, both conventions
    k = jnp.asarray(rng.standard_normal((T, K, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((T, K, D)), jnp.float32)
    want_k, want_v = write_kv_pages_reference(k_pages, v_pages, k, v, jnp.asarray(slots))
    got_k, got_v = write_kv_pages(k_pages, v_pages, k, v, jnp.asarray(slots), donate=donate)
    assert got_k.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got_k), want_k)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)


def test_slot_mapping_follows_the_block_tables():
    tables = jnp.asarray([[3, 1, 0], [2, 5, 4]], jnp.int32)
    positions = jnp.asarray([0, 5, 4, 9, 0], jnp.int32)
    seq_ids = jnp.asarray([0, 0, 1, 1, -1], jnp.int32)
    slots = slot_mapping_for(tables, positions, seq_ids, page_size=4)
    assert np.asarray(slots).tolist() == [12, 5, 20, 17, -1]


def _call(**kw):
    args = {
        "k_pages": jnp.zeros((3, 4, 2, 8)),
        "v_pages": jnp.zeros((3, 4, 2, 8)),
        "k": jnp.zeros((2, 2, 8)),
        "v": jnp.zeros((2, 2, 8)),
        "slot_mapping": jnp.asarray([0, 5], jnp.int32),
    }
    args.update(kw)
    return write_kv_pages(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slot_mapping": jnp.asarray([0, 13], jnp.int32)}, r"slot_mapping\[1\]=13"),
        ({"slot_mapping": jnp.asarray([0.0, 5.0])}, r"slot_mapping has dtype"),
        ({"slot_mapping": jnp.asarray([0], jnp.int32)}, r"slot_mapping has shape"),
        ({"k": jnp.zeros((2, 3, 8))}, r"\bk has shape"),
        ({"v": jnp.zeros((3, 2, 8))}, r"\bv has shape"),
        ({"v_pages": jnp.zeros((3, 4, 2, 8), jnp.bfloat16)}, r"v_pages dtype differs"),
        ({"k_pages": jnp.zeros((3, 4, 2))}, r"k_pages has shape"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_prefill_chunks_then_decodes_equal_dense_causal_attention(rng):
    """Write each step's K/V, attend through the pages: the same as one dense causal pass."""
    P, M, H, K, D, S = 4, 6, 4, 2, 16, 19
    N = 1 + 2 * M
    k_pages, v_pages = jnp.zeros((N, P, K, D)), jnp.zeros((N, P, K, D))
    tables = np.zeros((2, M), np.int32)
    tables[0], tables[1] = rng.permutation(np.arange(1, M + 1)), np.arange(M + 1, N)
    q_all = jnp.asarray(rng.standard_normal((2, S, H, D)), jnp.float32)
    k_all = jnp.asarray(rng.standard_normal((2, S, K, D)), jnp.float32)
    v_all = jnp.asarray(rng.standard_normal((2, S, K, D)), jnp.float32)
    want = flash_attention_reference(q_all, k_all, v_all)  # causal over all S tokens
    # Sequence 0 prefills in chunks of 7 while sequence 1 (same length) decodes after a
    # one-shot prefill of 12 tokens: steps of mixed work.
    steps = [((0, 7), (0, 12)), ((7, 14), (12, 13)), ((14, 19), (13, 14))]
    steps += [((19, 19), (t, t + 1)) for t in range(14, S)]
    for spans in steps:
        seq_ids, positions = [], []
        for b, (lo, hi) in enumerate(spans):
            seq_ids += [b] * (hi - lo)
            positions += list(range(lo, hi))
        seq_t, pos_t = np.asarray(seq_ids, np.int32), np.asarray(positions, np.int32)
        slots = slot_mapping_for(
            jnp.asarray(tables), jnp.asarray(pos_t), jnp.asarray(seq_t), page_size=P
        )
        k_new, v_new = k_all[seq_t, pos_t], v_all[seq_t, pos_t]
        k_pages, v_pages = write_kv_pages(k_pages, v_pages, k_new, v_new, slots)
        cu = np.concatenate([[0], np.cumsum([hi - lo for lo, hi in spans])]).astype(np.int32)
        lens = np.asarray([hi for _, hi in spans], np.int32)
        out = ragged_paged_attention(
            q_all[seq_t, pos_t],
            k_pages,
            v_pages,
            jnp.asarray(tables),
            jnp.asarray(lens),
            jnp.asarray(cu),
            interpret=True,
        )
        np.testing.assert_allclose(
            np.asarray(out), np.asarray(want[seq_t, pos_t]), rtol=1e-5, atol=1e-5
        )
