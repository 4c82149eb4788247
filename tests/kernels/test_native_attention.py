"""The C++ CPU kernel (XLA FFI): exact against the references on every code path (vector and
scalar page sizes and head dims, float32/float16/bfloat16 pages, GQA groups, tiles of prefill
chunks, empty and padding rows, a build without AVX2), a token's output independent of the
rest of the step, chosen by "auto" on the CPU, and clear reasons where it cannot be built."""

from __future__ import annotations

import ctypes
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.kernels import dispatch, paged_attention_reference, ragged_paged_attention_reference
from ligerjax.kernels import native_attention as native
from ligerjax.kernels.native_attention import native_paged_attention, native_ragged_paged_attention
from ligerjax.kernels.native_library import NativeBuild, flags_for, load_kernel

pytestmark = pytest.mark.skipif(
    not native.native_available(), reason=f"{native.native_unavailable_reason()}"
)

# (new tokens, context) per sequence: a chunk over three 16-token tiles after a cached prefix,
# a chunk from position 0, decodes, an idle row, a one-token context.
MIX = [(37, 50), (13, 13), (1, 17), (0, 5), (1, 1), (1, 29)]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def ragged_args(rng, mix, *, P, K, G, D, pad=3, dtype=jnp.float32):
    M = max(-(-ctx // P) for _, ctx in mix)
    B, N = len(mix), len(mix) * M + 1
    tables = np.zeros((B, M), np.int32)
    pool = rng.permutation(np.arange(1, N))
    for b, (_, ctx) in enumerate(mix):
        tables[b, : -(-ctx // P)] = pool[b * M : b * M + -(-ctx // P)]
    cu = np.concatenate([[0], np.cumsum([n for n, _ in mix])]).astype(np.int32)
    T = int(cu[-1]) + pad
    normal = lambda *shape, dt=jnp.float32: jnp.asarray(rng.standard_normal(shape), dt)  # noqa: E731
    return (
        normal(T, K * G, D),
        normal(N, P, K, D, dt=dtype),
        normal(N, P, K, D, dt=dtype),
        jnp.asarray(tables),
        jnp.asarray([c for _, c in mix], jnp.int32),
        jnp.asarray(cu),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize(
    ("page", "head_dim"),
    [(16, 64), (8, 128), (4, 16), (6, 20)],
    ids=["vector-P16-D64", "vector-P8-D128", "scalar-page", "scalar-both"],
)
def test_ragged_is_exact_on_every_path(rng, dtype, group, page, head_dim):
    K = 2 if group < 8 else 1
    args = ragged_args(rng, MIX, P=page, K=K, G=group, D=head_dim, dtype=dtype)
    out = jax.jit(native_ragged_paged_attention, static_argnames="sm_scale")(*args, sm_scale=0.3)
    ref = ragged_paged_attention_reference(*args, sm_scale=0.3)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) < 1e-5
    end = int(args[-1][-1])
    assert not np.asarray(out[end:]).any()  # padding tokens past the last sequence


def test_decode_is_exact_and_empty_contexts_are_zero(rng):
    q, k_pages, v_pages, tables, lens, _ = ragged_args(
        rng, [(1, 40), (1, 0), (1, 16), (1, 3)], P=16, K=3, G=3, D=64, pad=0
    )
    out = native_paged_attention(q, k_pages, v_pages, tables, lens, sm_scale=0.125)
    ref = paged_attention_reference(q, k_pages, v_pages, tables, lens, sm_scale=0.125)
    assert rel_err(out, ref) < 1e-5
    assert not np.asarray(out[1]).any()


def test_a_tokens_output_does_not_depend_on_the_rest_of_the_step(rng):
    q, k_pages, v_pages, tables, lens, cu = ragged_args(rng, MIX, P=16, K=3, G=3, D=64, pad=0)
    together = native_ragged_paged_attention(q, k_pages, v_pages, tables, lens, cu, sm_scale=0.2)
    for b in (0, 2):  # the long chunk alone, a decode alone
        lo, hi = int(cu[b]), int(cu[b + 1])
        alone = native_ragged_paged_attention(
            q[lo:hi],
            k_pages,
            v_pages,
            tables[b : b + 1],
            lens[b : b + 1],
            jnp.asarray([0, hi - lo], jnp.int32),
            sm_scale=0.2,
        )
        np.testing.assert_array_equal(np.asarray(alone), np.asarray(together[lo:hi]))


def _lowered(fn, args, platform: str) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_auto_runs_it_on_the_cpu(rng):
    args = ragged_args(rng, MIX, P=16, K=2, G=3, D=64)
    assert native.TARGET in _lowered(dispatch.ragged_paged_attention, args, "cpu")
    assert native.TARGET not in _lowered(dispatch.ragged_paged_attention, args, "cuda")
    decode = (args[0][:6], *args[1:5])
    assert native.TARGET in _lowered(dispatch.paged_decode_attention, decode, "cpu")
    bf16 = (args[0], args[1].astype(jnp.bfloat16), args[2].astype(jnp.bfloat16), *args[3:])
    assert native.TARGET in _lowered(dispatch.ragged_paged_attention, bf16, "cpu")
    big_pages = ragged_args(rng, MIX, P=512, K=2, G=3, D=16)
    assert native.TARGET not in _lowered(dispatch.ragged_paged_attention, big_pages, "cpu")
    out = dispatch.ragged_paged_attention(*args, sm_scale=0.3)
    ref = dispatch.ragged_paged_attention(*args, sm_scale=0.3, impl="fallback")
    assert rel_err(out, ref) < 1e-5


def test_native_impl_refuses_what_it_does_not_take(rng):
    big_pages = ragged_args(rng, MIX, P=512, K=2, G=3, D=16)
    with pytest.raises(ValueError, match=r"impl='native'.*float32\[\d+, 512, 2, 16\]"):
        dispatch.ragged_paged_attention(*big_pages, impl="native")
    with pytest.raises(ValueError, match=r"k_pages float32\[\d+, 512, 2, 16\], v_pages float32"):
        native_ragged_paged_attention(*big_pages, sm_scale=1.0)
    args = ragged_args(rng, MIX, P=16, K=2, G=3, D=64)
    mixed = (args[0], args[1], args[2].astype(jnp.float16), *args[3:])
    with pytest.raises(ValueError, match="v_pages float16; the kernel takes pages of one dtype"):
        native_ragged_paged_attention(*mixed, sm_scale=1.0)
    q = jnp.zeros((1, 4, 2, 16), jnp.float32)
    kv = jnp.zeros((1, 4, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="impl='native'"):
        dispatch.dense_attention(
            q,
            kv,
            kv,
            jnp.zeros((1, 4), jnp.int32),
            jnp.ones(1, jnp.int32),
            causal=True,
            sm_scale=1.0,
            impl="native",
        )


def test_unavailable_reasons_name_what_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGERJAX_NATIVE", "0")
    assert load_kernel(native.SOURCE, native.SYMBOL, native.TARGET) == "LIGERJAX_NATIVE=0"
    monkeypatch.delenv("LIGERJAX_NATIVE")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    reason = load_kernel(native.SOURCE, native.SYMBOL, native.TARGET)
    assert reason == "no C++ compiler 'no-such-compiler-here' (set CXX)"


def test_a_failing_build_reports_the_compiler_error(tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("int main( {\n")
    build = NativeBuild(broken, compiler="c++", cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match=r"broken\.cc"):
        build.build()
    assert not list((tmp_path / "cache").glob("*.so"))


def test_the_library_is_built_once_per_source_and_reused(tmp_path):
    build = NativeBuild(native.SOURCE, compiler="c++", cache_dir=tmp_path)
    path = build.build()
    assert path.exists() and path.parent == tmp_path
    stamp = path.stat().st_mtime_ns
    assert build.build() == path and path.stat().st_mtime_ns == stamp
    other = tmp_path / "copy.cc"
    other.write_text(Path(native.SOURCE).read_text() + "\n// changed\n")
    assert NativeBuild(other, compiler="c++", cache_dir=tmp_path).library_path() != path


def test_a_changed_header_beside_the_source_rebuilds(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in native.SOURCE.parent.iterdir():
        (src / f.name).write_text(f.read_text())
    build = NativeBuild(src / native.SOURCE.name, compiler="c++", cache_dir=tmp_path / "cache")
    before = build.library_path()
    (src / "share_out.h").write_text((src / "share_out.h").read_text() + "\n// changed\n")
    assert build.library_path() != before


def test_the_portable_build_without_avx2_is_exact_too(rng, tmp_path):
    flags = flags_for(())
    library = ctypes.CDLL(str(NativeBuild(native.SOURCE, "c++", tmp_path, flags=flags).build()))
    target = "ligerjax_test_portable_ragged_paged_attention"
    handler = jax.ffi.pycapsule(library.LigerjaxRaggedPagedAttention)
    jax.ffi.register_ffi_target(target, handler, platform="cpu")
    for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        args = ragged_args(rng, MIX, P=16, K=3, G=3, D=64, dtype=dtype)
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(args[0].shape, jnp.float32))
        out = call(*args, sm_scale=np.float32(0.3))
        assert rel_err(out, ragged_paged_attention_reference(*args, sm_scale=0.3)) < 1e-5, dtype
