"""Matrix products over pre-packed weights, in C++ on the CPU: an XLA FFI custom call.

XLA:CPU's GEMM copies (packs) the whole ``[K, N]`` weight matrix on every call, so the skinny
products of decode steps (8–64 rows) cost 2–3× the time it takes to read the weights once.
Here a weight is packed once, when it is loaded, into column panels ``w_pkc [P, K, 16]``
(:func:`pack_weight`); ``native/packed_matmul.cc`` streams the panels in order through a
6-row register tile, two panels wide (6 × 32) where the CPU has AVX-512 and one (6 × 16) with
AVX2, panels shared out over XLA's intra-op threads (docs/BENCHMARKS.md, "packed matmul").
Both tiles do each element's arithmetic in the same order: their results are equal bit for bit.

Every output element is summed in one fixed order whatever the number of rows, so a row's
result does not depend on the rest of the batch (the engine's determinism rests on it).

:func:`packed_matmul` runs the kernel on the CPU and an ``einsum`` over the same panels on
other backends. Built and loaded by :mod:`ligerjax.kernels.native_library`
(``LIGERJAX_NATIVE=0`` turns it off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ligerjax.kernels.native_library import SOURCE_DIR, kernel_unavailable_reason

SOURCE = SOURCE_DIR / "packed_matmul.cc"
SYMBOL = "LigerjaxPackedMatmul"
TARGET = "ligerjax_cpu_packed_matmul"
PANEL = 16  # kCols in the source

__all__ = [
    "PANEL",
    "matmul_unavailable_reason",
    "native_packed_matmul",
    "pack_weight",
    "packed_matmul",
    "packed_matmul_reference",
]


def matmul_unavailable_reason() -> str | None:
    """None once the kernel is built, loaded and registered for the CPU; else why not (logged
    once per process)."""
    return kernel_unavailable_reason(SOURCE, SYMBOL, TARGET, "matmul")


def pack_weight(w_kn: jax.Array) -> jax.Array:  # [P, K, 16], P = ceil(N / 16)
    """``w_kn [K, N]`` as column panels of 16, each panel's rows contiguous; the columns past
    ``N`` in the last panel are zero."""
    if w_kn.ndim != 2:
        raise ValueError(f"pack_weight: w_kn must be [K, N], got shape {tuple(w_kn.shape)}")
    K, N = w_kn.shape
    P = -(-N // PANEL)
    w_kn = jnp.pad(w_kn, ((0, 0), (0, P * PANEL - N)))
    return jnp.transpose(w_kn.reshape(K, P, PANEL), (1, 0, 2))


def packed_matmul_reference(
    x_mk: jax.Array, w_pkc: jax.Array, n: int, live_rows: jax.Array | int | None = None
) -> jax.Array:  # [M, n]
    """``x_mk @ W[:, :n]`` for ``w_pkc = pack_weight(W)``, in plain ``jnp``; rows from
    ``live_rows`` on are 0."""
    M = x_mk.shape[0]
    P = w_pkc.shape[0]
    out_mpc = jnp.einsum("mk,pkc->mpc", x_mk, w_pkc, precision=jax.lax.Precision.HIGHEST)
    out_mn = out_mpc.reshape(M, P * PANEL)[:, :n]
    if live_rows is None:
        return out_mn
    return jnp.where(jnp.arange(M)[:, None] < live_rows, out_mn, jnp.zeros_like(out_mn))


def native_packed_matmul(
    x_mk: jax.Array, w_pkc: jax.Array, n: int, live_rows: jax.Array | int | None = None
) -> jax.Array:  # [M, n] f32
    """``x_mk @ W[:, :n]`` by the C++ kernel (float32; needs it built: see
    :func:`matmul_unavailable_reason`). Rows from ``live_rows`` (a traced or concrete int;
    None: all) on are padding: the kernel does not multiply them and returns them as 0."""
    reason = matmul_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"native_packed_matmul: the C++ kernel is unavailable: {reason}")
    _check(x_mk, w_pkc, n)
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((x_mk.shape[0], n), jnp.float32), vmap_method="sequential"
    )
    rows = _live_rows(x_mk, live_rows)
    return call(x_mk.astype(jnp.float32), w_pkc.astype(jnp.float32), rows)


def packed_matmul(
    x_mk: jax.Array, w_pkc: jax.Array, n: int, live_rows: jax.Array | int | None = None
) -> jax.Array:  # [M, n] f32
    """``x_mk @ W[:, :n]`` for ``w_pkc = pack_weight(W)``: the C++ kernel when lowered for the
    CPU (where it could be built), :func:`packed_matmul_reference` elsewhere. Rows from
    ``live_rows`` on (None: no row) are padding and come out 0."""
    _check(x_mk, w_pkc, n)
    if matmul_unavailable_reason() is not None:
        return packed_matmul_reference(x_mk, w_pkc, n, live_rows).astype(jnp.float32)
    rows = _live_rows(x_mk, live_rows)
    return jax.lax.platform_dependent(
        x_mk,
        w_pkc,
        rows,
        cpu=lambda x, w, r: native_packed_matmul(x, w, n, r),
        default=lambda x, w, r: packed_matmul_reference(x, w, n, r).astype(jnp.float32),
    )


def _live_rows(x_mk: jax.Array, live_rows: jax.Array | int | None) -> jax.Array:  # [] int32
    return jnp.asarray(x_mk.shape[0] if live_rows is None else live_rows, jnp.int32).reshape(())


def _check(x_mk: jax.Array, w_pkc: jax.Array, n: int) -> None:
    P = w_pkc.shape[0] if w_pkc.ndim == 3 else 0
    if x_mk.ndim != 2 or w_pkc.ndim != 3 or w_pkc.shape[1:] != (x_mk.shape[1], PANEL):
        raise ValueError(
            f"packed matmul: x_mk {tuple(x_mk.shape)} and w_pkc {tuple(w_pkc.shape)} must be "
            f"[M, K] and [P, K, {PANEL}]"
        )
    if not (P - 1) * PANEL < n <= P * PANEL:
        raise ValueError(f"packed matmul: n={n} does not fit {P} panels of {PANEL} columns")
