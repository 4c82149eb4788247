"""Pallas flash attention against our reference, jax.nn.dot_product_attention and JAX's
mha_reference: causal and not, GQA, ragged tiles and lengths, absolute positions, f32/bf16.
Every kernel call runs in interpret mode here and compiled on a GPU when one is present."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu.attention import mha_reference

from ligerjax.kernels import flash_attention, flash_attention_reference
from ligerjax.kernels.block_sizes import FLASH_ATTENTION

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="gpu", marks=pytest.mark.gpu)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def draw(rng: np.random.Generator, shape, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), dtype)


def qkv(rng, B, T, S, H, K, D, dtype):
    return (
        draw(rng, (B, T, H, D), dtype),
        draw(rng, (B, S, K, D), dtype),
        draw(rng, (B, S, K, D), dtype),
    )


def mask_b1ts(q_positions, kv_lengths, S: int, causal: bool) -> jax.Array:
    s = jnp.arange(S)
    mask = s[None, None, :] < kv_lengths[:, None, None]
    if causal:
        mask = mask & (s[None, None, :] <= q_positions[:, :, None])
    return mask[:, None]


def f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gqa_chunk_on_cached_prefix_matches_references(rng, interpret, dtype, group, causal):
    # T and S not multiples of the 16-wide tiles; T < S: the chunk sits after a cached prefix.
    B, T, S, K, D = 2, 37, 61, 2 if group < 8 else 1, 32
    H = K * group
    q, k, v = qkv(rng, B, T, S, H, K, D, dtype)
    out = flash_attention(q, k, v, causal=causal, block_q=16, block_k=16, interpret=interpret)
    assert out.shape == (B, T, H, D) and out.dtype == dtype
    ref = flash_attention_reference(q, k, v, causal=causal)
    assert rel_err(out, ref) < TOL[dtype]
    pos = jnp.broadcast_to(S - T + jnp.arange(T), (B, T))
    mask = mask_b1ts(pos, jnp.full((B,), S), S, causal)
    dpa = jax.nn.dot_product_attention(*f32(q, k, v), mask=mask, implementation="xla")
    assert rel_err(out, dpa) < TOL[dtype]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_square_mha_matches_jax_mha_reference(rng, interpret, dtype, causal):
    B, T, H, D = 2, 48, 3, 64
    q, k, v = qkv(rng, B, T, T, H, H, D, dtype)
    out = flash_attention(
        q, k, v, causal=causal, sm_scale=0.2, block_q=16, block_k=32, interpret=interpret
    )
    ref = mha_reference(*f32(q, k, v), None, sm_scale=0.2, causal=causal)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("interpret", MODES)
def test_chunk_equals_the_tail_of_full_causal_attention(rng, interpret):
    B, S, T, H, K, D = 1, 50, 13, 4, 2, 16
    q_full, k, v = qkv(rng, B, S, S, H, K, D, jnp.float32)
    full = flash_attention_reference(q_full, k, v, causal=True)
    chunk = flash_attention(q_full[:, -T:], k, v, block_q=16, block_k=16, interpret=interpret)
    assert rel_err(chunk, full[:, -T:]) < 1e-5


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_lengths_empty_and_single_key_contexts(rng, interpret, dtype):
    B, T, S, H, K, D = 4, 20, 40, 6, 2, 16
    q, k, v = qkv(rng, B, T, S, H, K, D, dtype)
    lens = jnp.asarray([0, 1, 23, 40], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + 20, (B, T))
    out = flash_attention(
        q, k, v, q_positions=pos, kv_lengths=lens, block_q=16, block_k=16, interpret=interpret
    )
    ref = flash_attention_reference(q, k, v, q_positions=pos, kv_lengths=lens)
    assert rel_err(out, ref) < TOL[dtype]
    assert not np.asarray(out[0]).any()  # no key: exactly 0
    one_key = np.repeat(np.asarray(v[1, 0], np.float32), H // K, axis=0)  # [H, D]
    np.testing.assert_allclose(
        np.asarray(out[1], np.float32),
        np.broadcast_to(one_key, (T, H, D)),
        rtol=TOL[dtype],
        atol=TOL[dtype],
    )
    mask = mask_b1ts(pos, lens, S, True)[1:]
    dpa = jax.nn.dot_product_attention(*f32(q[1:], k[1:], v[1:]), mask=mask)
    assert rel_err(out[1:], dpa) < TOL[dtype]


@pytest.mark.parametrize("interpret", MODES)
def test_arbitrary_positions_and_rows_that_see_nothing(rng, interpret):
    B, T, S, H, K, D = 2, 24, 33, 2, 1, 16
    q, k, v = qkv(rng, B, T, S, H, K, D, jnp.float32)
    pos = jnp.asarray(rng.integers(-3, S + 3, size=(B, T)), jnp.int32)
    lens = jnp.asarray([S, 17], jnp.int32)
    out = flash_attention(
        q, k, v, q_positions=pos, kv_lengths=lens, block_q=16, block_k=16, interpret=interpret
    )
    ref = flash_attention_reference(q, k, v, q_positions=pos, kv_lengths=lens)
    assert rel_err(out, ref) < 1e-5
    assert not np.asarray(out)[np.asarray(pos) < 0].any()


@pytest.mark.parametrize("interpret", MODES)
def test_head_dim_not_a_power_of_two_and_default_tiles(rng, interpret):
    B, T, S, H, K, D = 1, 5, 70, 3, 1, 24
    q, k, v = qkv(rng, B, T, S, H, K, D, jnp.float32)
    out = flash_attention(q, k, v, interpret=interpret)
    assert rel_err(out, flash_attention_reference(q, k, v)) < 1e-5


def test_empty_query_or_context_gives_zeros(rng):
    q, k, v = qkv(rng, 1, 0, 8, 2, 1, 16, jnp.float32)
    assert flash_attention(q, k, v).shape == (1, 0, 2, 16)
    q, k, v = qkv(rng, 1, 3, 0, 2, 1, 16, jnp.float32)
    assert not np.asarray(flash_attention(q, k, v, causal=False)).any()


@pytest.mark.parametrize("head_dim", sorted(FLASH_ATTENTION))
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_lowering_of_the_shipped_tiles(head_dim, dtype):
    sd = jax.ShapeDtypeStruct
    B, T, H, K = 1, 1024, 8, 2

    def f(q, k, v):
        return flash_attention(q, k, v, interpret=False)

    lowered = (
        jax.jit(f)
        .trace(
            sd((B, T, H, head_dim), dtype),
            sd((B, T, K, head_dim), dtype),
            sd((B, T, K, head_dim), dtype),
        )
        .lower(lowering_platforms=("cuda",))
    )
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def _call(q=None, k=None, v=None, **kw):
    rng = np.random.default_rng(0)
    q = q if q is not None else draw(rng, (2, 4, 4, 16), jnp.float32)
    k = k if k is not None else draw(rng, (2, 6, 2, 16), jnp.float32)
    v = v if v is not None else k
    return flash_attention(q, k, v, **kw)


def _f(shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"q": _f((2, 4, 16))}, r"\bq has shape"),
        ({"k": _f((3, 6, 2, 16))}, r"\bk has shape"),
        ({"v": _f((2, 6, 2, 8))}, r"\bv has shape"),
        ({"k": _f((2, 6, 3, 16))}, r"\bk has 3 KV heads"),
        ({"q": _f((2, 4, 4, 16), jnp.int32)}, r"\bq has dtype int32"),
        ({"v": _f((2, 6, 2, 16), jnp.bfloat16)}, r"\bv dtype differs"),
        ({"q_positions": _f((2, 5), jnp.int32)}, r"q_positions has shape"),
        ({"q_positions": _f((2, 4))}, r"q_positions has dtype"),
        ({"kv_lengths": _f((2,))}, r"kv_lengths has dtype"),
        ({"kv_lengths": jnp.asarray([3, 7], jnp.int32)}, r"kv_lengths\[1\]=7 is out of range"),
        ({"block_q": 24}, r"block_q=24"),
        ({"block_k": 8}, r"block_k=8"),
        ({"sm_scale": float("nan")}, r"sm_scale"),
        ({"q": _f((2, 4, 4, 512)), "k": _f((2, 6, 2, 512))}, r"head dim D=512"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)
