"""The C++ kernels as compiled: the cache-line fetches their sources ask for are in the
machine code. They are hints with no visible effect, so a compiler may drop them without any
other test noticing (GCC's interprocedural analysis once removed the matmul's whole fetch as a
side-effect-free call: 5-10% slower at 16-32 rows, docs/BENCHMARKS.md)."""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from ligerjax.kernels import native_attention, native_matmul
from ligerjax.kernels.native_library import NativeBuild

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 prefetch instructions"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to read the library"),
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler"),
]


@pytest.mark.parametrize(
    "source", [native_matmul.SOURCE, native_attention.SOURCE], ids=lambda s: s.stem
)
def test_the_kernels_keep_their_prefetches(source, tmp_path):
    library = NativeBuild(source, "c++", tmp_path).build()
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "prefetcht1" in code, f"{source.name}: no prefetcht1 left in the compiled library"
