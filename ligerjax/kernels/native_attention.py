"""Ragged paged attention in C++ for the CPU: an XLA FFI custom call, built on first use.

XLA:CPU runs the pure-JAX fallback as gathers of each sequence's pages followed by many small
batched dots (~10 GFLOP/s). ``native/ragged_paged_attention.cc`` reads the pages in place
through the block table, with AVX2 logits and exponentials and XLA's own intra-op thread
pool: 2.5–11× the fallback per layer, decode bound by memory (docs/BENCHMARKS.md,
"CPU paged attention").
One kernel serves mixed steps (chunked prefill and decode) and plain decode (one query token
per sequence).

The source is compiled with the host's C++ compiler (``$CXX``, else ``c++``) for this CPU
(``-march=native``) into ``$LIGERJAX_CACHE_DIR`` (default ``~/.cache/ligerjax``) under a name
that hashes the source, flags, compiler, jaxlib and the CPU's features, then registered with
XLA for the CPU platform. ``LIGERJAX_NATIVE=0`` turns it off. Where it cannot be built,
:func:`native_unavailable_reason` says why (logged once) and dispatch keeps the fallback.
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
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "ragged_paged_attention.cc"
SYMBOL = "LigerjaxRaggedPagedAttention"
TARGET = "ligerjax_cpu_ragged_paged_attention"
PAGE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
MAX_PAGE_SIZE = 256  # kMaxPage in the source
DISABLE_ENV = "LIGERJAX_NATIVE"
CACHE_ENV = "LIGERJAX_CACHE_DIR"

__all__ = [
    "NativeBuild",
    "native_available",
    "native_paged_attention",
    "native_ragged_paged_attention",
    "native_supported",
    "native_unavailable_reason",
]


@dataclass(frozen=True)
class NativeBuild:
    """How the kernel's shared library is compiled, and where it is kept."""

    compiler: str
    cache_dir: Path
    flags: tuple[str, ...] = FLAGS
    source: Path = SOURCE

    @classmethod
    def from_environment(cls) -> NativeBuild:
        cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ligerjax"
        return cls(compiler=os.environ.get("CXX") or "c++", cache_dir=Path(cache) / "native")

    def library_path(self) -> Path:
        """The library's path in the cache: one per source, flags, compiler, jaxlib and CPU."""
        version = subprocess.run(
            [self.compiler, "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        key = "\n".join(
            [self.source.read_text(), " ".join(self.flags), version, jaxlib.__version__, _cpu()]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"ragged_paged_attention-{digest}.so"

    def build(self) -> Path:
        """The library, compiled unless the cache holds it (atomically: concurrent builders
        each write a temporary file and rename it)."""
        path = self.library_path()
        if path.exists():
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("ligerjax: compiling the C++ CPU attention kernel (once) into %s", path)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            out = Path(tmp) / path.name
            cmd = [self.compiler, *self.flags, "-I", jax.ffi.include_dir(), str(self.source)]
            done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            os.replace(out, path)
        return path


def _cpu() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def native_unavailable_reason() -> str | None:
    """None once the kernel is built, loaded and registered for the CPU; else why not.

    Runs once per process (XLA's custom-call registry is process-wide).
    """
    reason = _load()
    if reason is not None:
        log.warning("ligerjax: C++ CPU attention unavailable (%s); using the XLA fallback", reason)
    return reason


def _load() -> str | None:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if os.name != "posix":
        return f"no build for os.name={os.name!r}"
    build = NativeBuild.from_environment()
    if shutil.which(build.compiler) is None:
        return f"no C++ compiler {build.compiler!r} (set CXX)"
    try:
        library = ctypes.CDLL(str(build.build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        return str(err)
    handler = jax.ffi.pycapsule(getattr(library, SYMBOL))
    jax.ffi.register_ffi_target(TARGET, handler, platform="cpu")
    return None


def native_available() -> bool:
    """Whether the C++ kernel runs in this process (see the module doc)."""
    return native_unavailable_reason() is None


def native_supported(kv_dtype: jnp.dtype, page_size: int) -> bool:
    """Whether the kernel takes these pages: float32, float16 or bfloat16 K/V, pages of at
    most 256 tokens."""
    return jnp.dtype(kv_dtype) in PAGE_DTYPES and page_size <= MAX_PAGE_SIZE


def native_ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, P, K, D] float32, float16 or bfloat16
    v_pages: jax.Array,  # [N, P, K, D] the same dtype
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32, new tokens included
    cu_q_lens: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float,
) -> jax.Array:  # [T, H, D], q's dtype
    """:func:`ligerjax.kernels.ragged_paged_attention`'s contract, run by the C++ kernel.

    Needs :func:`native_available`; computes in float32 (16-bit pages are converted exactly
    as they are read).
    """
    reason = native_unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"native_ragged_paged_attention: the C++ kernel is unavailable: {reason}"
        )
    if not native_supported(k_pages.dtype, k_pages.shape[1]) or v_pages.dtype != k_pages.dtype:
        raise ValueError(
            f"native_ragged_paged_attention: k_pages {k_pages.dtype}{list(k_pages.shape)}, "
            f"v_pages {v_pages.dtype}; the kernel takes pages of one dtype (float32, float16 or "
            f"bfloat16) and at most {MAX_PAGE_SIZE} tokens"
        )
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )
    as_i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    out = call(
        q.astype(jnp.float32),
        k_pages,
        v_pages,
        as_i32(block_tables),
        as_i32(context_lens),
        as_i32(cu_q_lens),
        sm_scale=np.float32(sm_scale),
    )
    return out.astype(q.dtype)


def native_paged_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, P, K, D] float32, float16 or bfloat16
    v_pages: jax.Array,  # [N, P, K, D] the same dtype
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    *,
    sm_scale: float,
) -> jax.Array:  # [B, H, D]
    """Decode (one query per sequence, at position ``context_lens - 1``) by the C++ kernel."""
    cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return native_ragged_paged_attention(
        q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, sm_scale=sm_scale
    )
