"""Greedy tokens and their log-probabilities, in C++ on the CPU: an XLA FFI custom call.

For a batch of logits ``[B, V]``: each row's first maximum and its log-probability
``(logit - max) - log Σ exp(logit - max)``. XLA:CPU runs the argmax and the exponential sum as
single-threaded reductions (~8 ms for 64 rows of a 49k vocabulary); ``native/greedy_sample.cc``
reads each row twice from cache with AVX2 on XLA's intra-op threads (docs/BENCHMARKS.md,
"greedy sampling"). :func:`greedy_sample` runs it when lowered for the CPU and
:func:`greedy_sample_reference` elsewhere. Built and loaded by
:mod:`ligerjax.kernels.native_library` (``LIGERJAX_NATIVE=0`` turns it off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ligerjax.kernels.native_library import SOURCE_DIR, kernel_unavailable_reason

SOURCE = SOURCE_DIR / "greedy_sample.cc"
SYMBOL = "LigerjaxGreedySample"
TARGET = "ligerjax_cpu_greedy_sample"

__all__ = [
    "greedy_sample",
    "greedy_sample_reference",
    "native_greedy_sample",
    "sampling_unavailable_reason",
]


def sampling_unavailable_reason() -> str | None:
    """None once the kernel is built, loaded and registered for the CPU; else why not (logged
    once per process)."""
    return kernel_unavailable_reason(SOURCE, SYMBOL, TARGET, "greedy sampling")


def greedy_sample_reference(logits_bv: jax.Array) -> tuple[jax.Array, jax.Array]:  # [B] x2
    """``(token_b, logprob_b)``: each row's first maximum (int32) and its log-probability."""
    max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    log_sum_b = jnp.log(jnp.sum(jnp.exp(logits_bv - max_b1), axis=-1))
    token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    picked_b = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0]
    return token_b, (picked_b - max_b1[:, 0]) - log_sum_b


def native_greedy_sample(logits_bv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`greedy_sample_reference` by the C++ kernel (needs it built: see
    :func:`sampling_unavailable_reason`)."""
    reason = sampling_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"native_greedy_sample: the C++ kernel is unavailable: {reason}")
    _check(logits_bv)
    B = logits_bv.shape[0]
    call = jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.float32)),
        vmap_method="sequential",
    )
    token_b, logprob_b = call(logits_bv.astype(jnp.float32))
    return token_b, logprob_b


def greedy_sample(logits_bv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`greedy_sample_reference`'s result: the C++ kernel when lowered for the CPU (where
    it could be built), the reference elsewhere."""
    _check(logits_bv)
    if sampling_unavailable_reason() is not None:
        return greedy_sample_reference(logits_bv)
    token_b, logprob_b = jax.lax.platform_dependent(
        logits_bv, cpu=native_greedy_sample, default=greedy_sample_reference
    )
    return token_b, logprob_b


def _check(logits_bv: jax.Array) -> None:
    if logits_bv.ndim != 2 or logits_bv.dtype != jnp.float32:
        raise ValueError(
            f"greedy sample: logits_bv must be [B, V] float32, got "
            f"{logits_bv.dtype}{list(logits_bv.shape)}"
        )
