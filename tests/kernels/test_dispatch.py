"""The per-backend entry points: every implementation agrees, "auto" lowers to the Triton
kernels for CUDA and, for the CPU, to the C++ kernel for paged attention (where it is built)
and the blockwise fallback otherwise, and ops.attention goes through them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax import ops
from ligerjax.kernels import dispatch, flash_attention_reference
from ligerjax.kernels.native_attention import TARGET as NATIVE
from ligerjax.kernels.native_attention import native_available

TRITON = "__gpu$xla.gpu.triton"


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def dense_args(rng, B=2, T=21, S=40, H=6, K=2, D=16):
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32)
    pos = jnp.broadcast_to(S - T + jnp.arange(T, dtype=jnp.int32), (B, T))
    return q, k, v, pos, jnp.asarray([S, 11], jnp.int32)


def paged_args(rng, *, ragged: bool):
    P, M, H, K, D, N = 8, 4, 4, 2, 16, 12
    mix = [(5, 20), (1, 9), (0, 0)] if ragged else [(1, 20), (1, 9), (1, 0)]
    tables = np.zeros((3, M), np.int32)
    tables[0, :3], tables[1, :2] = [7, 2, 10], [4, 11]
    cu = np.concatenate([[0], np.cumsum([n for n, _ in mix])]).astype(np.int32)
    T = int(cu[-1]) + 1
    q = jnp.asarray(rng.standard_normal((T if ragged else 3, H, D)), jnp.float32)
    k_pages = jnp.asarray(rng.standard_normal((N, P, K, D)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((N, P, K, D)), jnp.float32)
    lens = jnp.asarray([c for _, c in mix], jnp.int32)
    args = (q, k_pages, v_pages, jnp.asarray(tables), lens)
    return (*args, jnp.asarray(cu)) if ragged else args


IMPLS = ["auto", "fallback", "interpret", "reference"]
PAGED_IMPLS = [*IMPLS, "native"] if native_available() else IMPLS


def test_dense_implementations_agree(rng):
    args = dense_args(rng)
    outs = {
        impl: dispatch.dense_attention(*args, causal=True, sm_scale=0.3, impl=impl)
        for impl in IMPLS
    }
    for impl in IMPLS:
        assert rel_err(outs[impl], outs["reference"]) < 1e-5, impl


def test_paged_decode_implementations_agree(rng):
    args = paged_args(rng, ragged=False)
    outs = {impl: dispatch.paged_decode_attention(*args, impl=impl) for impl in PAGED_IMPLS}
    for impl in PAGED_IMPLS:
        assert rel_err(outs[impl], outs["reference"]) < 1e-5, impl


def test_ragged_implementations_agree(rng):
    args = paged_args(rng, ragged=True)
    outs = {
        impl: dispatch.ragged_paged_attention(*args, sm_scale=0.25, impl=impl)
        for impl in PAGED_IMPLS
    }
    for impl in PAGED_IMPLS:
        assert rel_err(outs[impl], outs["reference"]) < 1e-5, impl


def test_ops_attention_runs_the_dispatched_kernel(rng):
    q, k, v, pos, lens = dense_args(rng)
    out = ops.attention(q, k, v, q_positions=pos, kv_lengths=lens)
    ref = flash_attention_reference(q, k, v, q_positions=pos, kv_lengths=lens)
    assert rel_err(out, ref) < 1e-5


def _lowered_text(fn, args, platform: str) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_auto_lowers_to_triton_for_cuda_and_to_cpu_kernels_for_cpu(rng):
    dense = dense_args(rng)
    paged = paged_args(rng, ragged=False)
    ragged = paged_args(rng, ragged=True)
    native = NATIVE if native_available() else "stablehlo.while"
    calls = [
        (lambda *a: ops.attention(*a[:3], q_positions=a[3], kv_lengths=a[4]), dense, "while"),
        (lambda *a: dispatch.paged_decode_attention(*a), paged, native),
        (lambda *a: dispatch.ragged_paged_attention(*a), ragged, native),
    ]
    for fn, args, cpu_marker in calls:
        assert TRITON in _lowered_text(fn, args, "cuda")
        cpu = _lowered_text(fn, args, "cpu")
        assert TRITON not in cpu and cpu_marker in cpu


def test_shapes_the_kernels_do_not_take_fall_back_everywhere(rng):
    # A page size of 6 is not a power of two: even the CUDA program uses the fallback.
    k_pages = jnp.asarray(rng.standard_normal((5, 6, 1, 16)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 2, 16)), jnp.float32)
    tables = jnp.asarray([[1, 2], [3, 0]], jnp.int32)
    lens = jnp.asarray([12, 4], jnp.int32)
    args = (q, k_pages, k_pages, tables, lens)
    assert TRITON not in _lowered_text(dispatch.paged_decode_attention, args, "cuda")
    out = dispatch.paged_decode_attention(*args)
    ref = dispatch.paged_decode_attention(*args, impl="reference")
    assert rel_err(out, ref) < 1e-5


def test_unknown_impl_raises_value_error(rng):
    with pytest.raises(ValueError, match="impl='triton'"):
        dispatch.dense_attention(*dense_args(rng), causal=True, sm_scale=1.0, impl="triton")


def test_attention_fallback_keeps_the_ops_signature(rng):
    q, k, v, pos, lens = dense_args(rng)
    out = dispatch.attention_fallback(q, k, v, pos, lens, causal=False, sm_scale=0.5)
    ref = flash_attention_reference(
        q, k, v, causal=False, sm_scale=0.5, q_positions=pos, kv_lengths=lens
    )
    assert rel_err(out, ref) < 1e-5


def test_an_f32_query_over_a_bf16_cache_is_accepted_everywhere(rng):
    q, k_pages, v_pages, tables, lens, cu = paged_args(rng, ragged=True)
    bf16 = (k_pages.astype(jnp.bfloat16), v_pages.astype(jnp.bfloat16))
    args = (q, *bf16, tables, lens, cu)
    ref = dispatch.ragged_paged_attention(*args, impl="reference")
    for impl in IMPLS:
        out = dispatch.ragged_paged_attention(*args, impl=impl)
        assert out.dtype == jnp.float32
        assert rel_err(out, ref) < 2e-2, impl
    assert TRITON in _lowered_text(dispatch.ragged_paged_attention, args, "cuda")
    dq, dk, dv, pos, _ = dense_args(rng)
    out = ops.attention(dq, dk.astype(jnp.bfloat16), dv.astype(jnp.bfloat16), q_positions=pos)
    assert out.dtype == jnp.float32
