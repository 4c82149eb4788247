"""The C++ kernels as compiled: the target flags come from the environment
(``LIGERJAX_NATIVE_ARCH``), and the cache-line fetches their sources ask for are in the
machine code. Fetches are hints with no visible effect, so a compiler may drop them without
any other test noticing (GCC's interprocedural analysis once removed the matmul's whole fetch
as a side-effect-free call: 5-10% slower at 16-32 rows, docs/BENCHMARKS.md)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from ligerjax.kernels import native_attention, native_matmul
from ligerjax.kernels.native_library import ARCH_ENV, CACHE_ENV, FLAGS, NativeBuild, cpu_flags

MISSING = (
    "not an x86 machine" if platform.machine() != "x86_64"
    else "no objdump to read the library" if shutil.which("objdump") is None
    else "no C++ compiler" if shutil.which("c++") is None
    else None
)  # fmt: skip
needs_objdump = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def machine_code(library: Path) -> str:
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_the_target_flags_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(ARCH_ENV, raising=False)
    native = NativeBuild.from_environment(native_matmul.SOURCE)
    assert native.flags == FLAGS and native.cache_dir == tmp_path / "native"
    monkeypatch.setenv(ARCH_ENV, "-mavx2  -mfma")
    avx2 = NativeBuild.from_environment(native_matmul.SOURCE)
    assert avx2.flags == ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w")
    assert avx2.library_path() != native.library_path()


@needs_objdump
@pytest.mark.skipif("avx512f" not in cpu_flags().split(), reason="the host has no AVX-512")
def test_the_matmul_takes_avx512_unless_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(ARCH_ENV, raising=False)
    assert "%zmm" in machine_code(NativeBuild.from_environment(native_matmul.SOURCE).build())
    monkeypatch.setenv(ARCH_ENV, "-mavx2 -mfma")
    code = machine_code(NativeBuild.from_environment(native_matmul.SOURCE).build())
    assert "%ymm" in code and "%zmm" not in code


@needs_objdump
@pytest.mark.parametrize(
    "source", [native_matmul.SOURCE, native_attention.SOURCE], ids=lambda s: s.stem
)
def test_the_kernels_keep_their_prefetches(source, tmp_path):
    code = machine_code(NativeBuild(source, "c++", tmp_path).build())
    assert "prefetcht1" in code, f"{source.name}: no prefetcht1 left in the compiled library"
