"""The C++ packed matmul (XLA FFI): against float64 products for row counts around the 6-row
tile, depths across the 256-row blocks and partial last panels; a row's result independent of
the other rows; padding rows past a live count skipped and zero; chosen on the CPU by
``packed_matmul``; a portable build without AVX2; AVX-512 and AVX2 tiles equal bit for bit;
errors that name the bad shapes."""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.kernels import native_matmul as nm
from ligerjax.kernels.native_library import NativeBuild, cpu_flags, flags_for
from ligerjax.kernels.native_matmul import (
    native_packed_matmul,
    pack_weight,
    packed_matmul,
    packed_matmul_reference,
)

pytestmark = pytest.mark.skipif(
    nm.matmul_unavailable_reason() is not None, reason=f"{nm.matmul_unavailable_reason()}"
)


def operands(rng, M, K, N):
    x_mk = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w_kn = jnp.asarray(rng.standard_normal((K, N)), jnp.float32)
    return x_mk, w_kn


def f64_product(x_mk, w_kn) -> np.ndarray:
    return np.asarray(x_mk, np.float64) @ np.asarray(w_kn, np.float64)


def assert_close(out, ref, K):
    # float32 sums of K products of unit normals: error grows like sqrt(K) * eps * |terms|
    tol = 4e-6 * max(K, 1) ** 0.5 * 4
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("K,N", [(20, 37), (256, 16), (600, 96), (1, 5)])
def test_matches_the_float64_product(rng, M, K, N):
    x_mk, w_kn = operands(rng, M, K, N)
    out = jax.jit(native_packed_matmul, static_argnums=2)(x_mk, pack_weight(w_kn), N)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert_close(out, f64_product(x_mk, w_kn), K)


def test_empty_products(rng):
    for M, K, N in [(0, 8, 16), (4, 0, 16), (4, 8, 0)]:
        x_mk, w_kn = operands(rng, M, K, N)
        out = native_packed_matmul(x_mk, pack_weight(w_kn), N)
        assert out.shape == (M, N) and not np.any(np.asarray(out))


def test_a_row_does_not_depend_on_the_other_rows(rng):
    x_mk, w_kn = operands(rng, 64, 600, 40)
    w_pkc = pack_weight(w_kn)
    step = jax.jit(native_packed_matmul, static_argnums=2)
    all_rows = np.asarray(step(x_mk, w_pkc, 40))
    for lo, hi in [(0, 1), (5, 6), (3, 10), (17, 64), (6, 12)]:
        np.testing.assert_array_equal(np.asarray(step(x_mk[lo:hi], w_pkc, 40)), all_rows[lo:hi])


def test_rows_from_live_rows_on_are_padding(rng):
    x_mk, w_kn = operands(rng, 20, 600, 40)
    w_pkc = pack_weight(w_kn)
    all_rows = np.asarray(native_packed_matmul(x_mk, w_pkc, 40))
    for fn in (native_packed_matmul, packed_matmul, packed_matmul_reference):
        step = jax.jit(lambda x, w, live, fn=fn: fn(x, w, 40, live))
        for live in [0, 1, 6, 13, 20, 99]:
            out = np.asarray(step(x_mk, w_pkc, jnp.int32(live)))
            n = min(live, 20)
            assert not np.any(out[n:])
            if fn is packed_matmul_reference:  # another float32 summation order
                assert_close(out[:n], np.asarray(all_rows[:n], np.float64), 600)
            else:  # the live rows are the same sums, bit for bit
                np.testing.assert_array_equal(out[:n], all_rows[:n])
        assert step._cache_size() == 1  # the count is an operand, not a shape


def test_packed_matmul_runs_the_kernel_on_the_cpu_and_the_reference_elsewhere(rng):
    x_mk, w_kn = operands(rng, 9, 48, 33)
    w_pkc = pack_weight(w_kn)
    cpu_text = jax.jit(packed_matmul, static_argnums=2).lower(x_mk, w_pkc, 33).as_text()
    assert nm.TARGET in cpu_text
    out = jax.jit(packed_matmul, static_argnums=2)(x_mk, w_pkc, 33)
    ref = packed_matmul_reference(x_mk, w_pkc, 33)
    assert_close(out, np.asarray(ref, np.float64), 48)
    assert_close(ref, f64_product(x_mk, w_kn), 48)


def test_pack_weight_lays_out_column_panels():
    w_kn = jnp.arange(3 * 20, dtype=jnp.float32).reshape(3, 20)
    w_pkc = pack_weight(w_kn)
    assert w_pkc.shape == (2, 3, 16)
    np.testing.assert_array_equal(w_pkc[1, :, :4], w_kn[:, 16:])
    assert not np.any(np.asarray(w_pkc[1, :, 4:]))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        pack_weight(jnp.zeros((2, 3, 4)))


def test_bad_shapes_are_named(rng):
    x_mk, w_kn = operands(rng, 4, 8, 20)
    w_pkc = pack_weight(w_kn)
    with pytest.raises(ValueError, match=r"x_mk \(4, 7\) and w_pkc \(2, 8, 16\)"):
        packed_matmul(x_mk[:, :7], w_pkc, 20)
    with pytest.raises(ValueError, match="n=40 does not fit 2 panels"):
        packed_matmul(x_mk, w_pkc, 40)
    with pytest.raises(ValueError, match="n=16 does not fit 2 panels"):
        native_packed_matmul(x_mk, w_pkc, 16)


def build_and_register(tmp_path, flags, target) -> str:
    """The kernel compiled with ``flags`` (into its own cache) and registered as ``target``."""
    library = ctypes.CDLL(str(NativeBuild(nm.SOURCE, "c++", tmp_path, flags=flags).build()))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.LigerjaxPackedMatmul), "cpu")
    return target


def call_target(target, x_mk, w_kn, live_rows) -> np.ndarray:
    M, N = x_mk.shape[0], w_kn.shape[1]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((M, N), jnp.float32))
    return np.asarray(call(x_mk, pack_weight(w_kn), jnp.int32(live_rows)))


def test_the_portable_build_without_avx2_matches_too(rng, tmp_path):
    target = build_and_register(tmp_path, flags_for(()), "ligerjax_test_portable_packed_matmul")
    for M, K, N in [(7, 300, 37), (1, 16, 16), (6, 40, 80)]:
        x_mk, w_kn = operands(rng, M, K, N)
        out = call_target(target, x_mk, w_kn, M - 1)
        assert_close(out[: M - 1], f64_product(x_mk, w_kn)[: M - 1], K)
        assert not np.any(out[M - 1 :])


@pytest.mark.skipif("avx512f" not in cpu_flags().split(), reason="the host has no AVX-512")
def test_the_avx512_and_avx2_tiles_agree_bit_for_bit(rng, tmp_path):
    avx2 = build_and_register(
        tmp_path / "avx2", flags_for(("-mavx2", "-mfma")), "ligerjax_test_avx2_packed_matmul"
    )
    avx512 = build_and_register(
        tmp_path / "avx512",
        flags_for(("-mavx512f", "-mavx2", "-mfma")),
        "ligerjax_test_avx512_packed_matmul",
    )
    # panel pairs, a lone full panel (48 = three panels) and a partial one; depths within and
    # across blocks; last row groups of 4, 1, 2, 3, 5 and 6 rows
    cases = [(64, 600, 40), (13, 300, 7 * 16 + 3), (2, 576, 192), (9, 1536, 64), (11, 40, 33),
             (12, 257, 48)]  # fmt: skip
    for M, K, N in cases:
        x_mk, w_kn = operands(rng, M, K, N)
        out = call_target(avx512, x_mk, w_kn, M)
        np.testing.assert_array_equal(out, call_target(avx2, x_mk, w_kn, M))
        assert_close(out, f64_product(x_mk, w_kn), K)
