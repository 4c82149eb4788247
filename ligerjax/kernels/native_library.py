"""Building and loading the C++ CPU kernels (XLA FFI custom calls) in ``native/``.

Each kernel is one source file (plus the shared headers beside it), compiled on first use
with the host's C++ compiler (``$CXX``, else ``c++``) for this CPU (``-march=native``; other
target flags from ``$LIGERJAX_NATIVE_ARCH``, e.g. ``"-mavx2 -mfma"`` for the AVX2 code paths
on an AVX-512 host) into ``$LIGERJAX_CACHE_DIR`` (default ``~/.cache/ligerjax``) under a
name that hashes the sources, flags, compiler, jaxlib and the CPU's features, then
registered with XLA for the CPU platform. ``LIGERJAX_NATIVE=0`` turns every kernel off; where
one cannot be built, :func:`load_kernel` says why and its caller keeps the XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "native"
NATIVE_ARCH = "-march=native"
FLAGS = ("-O3", NATIVE_ARCH, "-std=c++17", "-shared", "-fPIC", "-w")
DISABLE_ENV = "LIGERJAX_NATIVE"
CACHE_ENV = "LIGERJAX_CACHE_DIR"
ARCH_ENV = "LIGERJAX_NATIVE_ARCH"  # target flags in place of -march=native

__all__ = [
    "ARCH_ENV",
    "CACHE_ENV",
    "DISABLE_ENV",
    "FLAGS",
    "SOURCE_DIR",
    "NativeBuild",
    "cpu_flags",
    "flags_for",
    "load_kernel",
]


@dataclass(frozen=True)
class NativeBuild:
    """How one kernel's shared library is compiled, and where it is kept."""

    source: Path  # the kernel's .cc; headers are looked up beside it
    compiler: str
    cache_dir: Path
    flags: tuple[str, ...] = FLAGS

    @classmethod
    def from_environment(cls, source: Path) -> NativeBuild:
        """The build ``$CXX``, ``$LIGERJAX_CACHE_DIR`` and ``$LIGERJAX_NATIVE_ARCH`` ask for."""
        cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ligerjax"
        flags = flags_for((os.environ.get(ARCH_ENV) or NATIVE_ARCH).split())
        return cls(source, os.environ.get("CXX") or "c++", Path(cache) / "native", flags)

    def library_path(self) -> Path:
        """The library's path in the cache: one per sources, flags, compiler, jaxlib and CPU."""
        version = subprocess.run(
            [self.compiler, "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        headers = [h.read_text() for h in sorted(self.source.parent.glob("*.h"))]
        key = "\n".join(
            [self.source.read_text(), *headers, " ".join(self.flags), version,
             jaxlib.__version__, cpu_flags()]
        )  # fmt: skip
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.source.stem}-{digest}.so"

    def build(self) -> Path:
        """The library, compiled unless the cache holds it (atomically: concurrent builders
        each write a temporary file and rename it)."""
        path = self.library_path()
        if path.exists():
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("ligerjax: compiling the C++ CPU kernel %s (once) into %s", self.source.name, path)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            out = Path(tmp) / path.name
            includes = ["-I", jax.ffi.include_dir(), "-I", str(self.source.parent)]
            cmd = [self.compiler, *self.flags, *includes, str(self.source)]
            done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            os.replace(out, path)
        return path


def flags_for(arch: Sequence[str]) -> tuple[str, ...]:
    """:data:`FLAGS` with the target ``arch`` (e.g. ``("-mavx2", "-mfma")``; none: the
    compiler's portable default) in place of ``-march=native``."""
    return tuple(f for g in FLAGS for f in (arch if g == NATIVE_ARCH else [g]))


def cpu_flags() -> str:
    """The CPU's feature-flags line of /proc/cpuinfo (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_kernel(source: Path, symbol: str, target: str) -> str | None:
    """Build ``source``, register its handler ``symbol`` as the CPU custom call ``target``;
    None once done, else why it could not be (the environment is read on every call)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if os.name != "posix":
        return f"no build for os.name={os.name!r}"
    build = NativeBuild.from_environment(source)
    if shutil.which(build.compiler) is None:
        return f"no C++ compiler {build.compiler!r} (set CXX)"
    try:
        library = ctypes.CDLL(str(build.build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        return str(err)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


@functools.cache
def kernel_unavailable_reason(source: Path, symbol: str, target: str, what: str) -> str | None:
    """:func:`load_kernel` once per process (XLA's custom-call registry is process-wide),
    logging why not, if not, naming ``what`` the kernel does."""
    reason = load_kernel(source, symbol, target)
    if reason is not None:
        log.warning("ligerjax: C++ CPU %s unavailable (%s); using XLA's", what, reason)
    return reason
