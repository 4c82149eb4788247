"""Per-backend choice of the attention implementation: the entry points models and engine call.

``impl`` picks the implementation:

* ``"auto"`` (default): the Pallas Triton kernel when the program is lowered for a GPU; on the
  CPU, paged attention (float32, float16 or bfloat16 pages) runs the C++ kernel
  (:mod:`ligerjax.kernels.native_attention`) where it could be built, everything else the
  pure-JAX blockwise fallback. The choice is made at lowering time with
  ``lax.platform_dependent``, so one traced program serves both, and a deviceless GPU compile
  from a CPU host gets the real kernels. Shapes the Pallas kernels do not take (head dims
  above 256; for paged attention, page sizes or head dims that are not powers of two) use
  the CPU's implementation on GPUs too.
* ``"pallas"``: the Pallas kernel compiled for the GPU; ``"interpret"``: the Pallas kernel in
  interpret mode (any backend; slow, for tests); ``"native"``: the C++ CPU kernel (paged
  attention only); ``"fallback"``: the blockwise pure-JAX version; ``"reference"``: the dense
  plain-``jnp`` reference (O(S²) memory).

``q`` may have another float dtype than K/V (say an f32 model over a bf16 cache): the
fallbacks compute in f32 anyway, and the kernels get ``q`` cast to the K/V dtype; the output
has ``q``'s dtype. Pallas kernels inside ``shard_map`` need ``check_vma=False``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
from jax import lax

from ligerjax.kernels import fallback
from ligerjax.kernels.block_sizes import MAX_HEAD_DIM
from ligerjax.kernels.flash_attention import (
    check_attention_args,
    flash_attention,
    flash_attention_reference,
)
from ligerjax.kernels.kv_writer import write_kv_pages
from ligerjax.kernels.native_attention import (
    MAX_PAGE_SIZE,
    native_available,
    native_paged_attention,
    native_ragged_paged_attention,
    native_supported,
)
from ligerjax.kernels.paged_attention import (
    check_paged_args,
    paged_attention,
    paged_attention_reference,
    pallas_paged_supported,
)
from ligerjax.kernels.ragged_paged_attention import (
    check_ragged_args,
    ragged_paged_attention_reference,
)
from ligerjax.kernels.ragged_paged_attention import (
    ragged_paged_attention as pallas_ragged_paged_attention,
)

Impl = Literal["auto", "pallas", "interpret", "native", "fallback", "reference"]
IMPLS: tuple[str, ...] = ("auto", "pallas", "interpret", "native", "fallback", "reference")
GPU_PLATFORMS = ("cuda", "rocm")

__all__ = [
    "IMPLS",
    "attention_fallback",
    "dense_attention",
    "paged_decode_attention",
    "ragged_paged_attention",
    "write_kv_pages",
]


def _check_impl(fn: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl={impl!r} is not one of {IMPLS}")


def _in_kv_dtype(kernel: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``kernel`` with ``q`` (first argument) cast to the K/V dtype (second) and back."""

    def run(q, kv, *rest, interpret):
        return kernel(q.astype(kv.dtype), kv, *rest, interpret=interpret).astype(q.dtype)

    return run


def _choose(
    impl: str,
    args: tuple[jax.Array, ...],
    *,
    kernel: Callable[..., jax.Array],
    fallback_fn: Callable[..., jax.Array],
    reference: Callable[..., jax.Array],
    kernel_ok: bool,
    native: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """Run ``args`` through the implementation ``impl`` names (see the module doc).

    ``native`` is the C++ CPU kernel where this entry point has one and the arguments suit it.
    """
    kernel = _in_kv_dtype(kernel)
    if impl == "native":
        if native is None:
            raise ValueError(
                "impl='native': the C++ kernel runs paged attention over float32, float16 or "
                f"bfloat16 pages of at most {MAX_PAGE_SIZE} tokens; got K/V "
                f"{args[1].dtype}{list(args[1].shape)}"
            )
        return native(*args)
    if impl == "fallback":
        return fallback_fn(*args)
    if impl == "reference":
        return reference(*args)
    if impl == "pallas":
        return kernel(*args, interpret=False)
    if impl == "interpret":
        return kernel(*args, interpret=True)
    branches: dict[str, Callable[..., jax.Array]] = {}
    if kernel_ok:
        branches.update(dict.fromkeys(GPU_PLATFORMS, functools.partial(kernel, interpret=False)))
    if native is not None and native_available():
        branches["cpu"] = native
    if not branches:
        return fallback_fn(*args)
    return lax.platform_dependent(*args, default=fallback_fn, **branches)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "impl"))
def _dense_attention(q, k, v, q_positions, kv_lengths, *, causal, sm_scale, impl):
    knobs = {"causal": causal, "sm_scale": sm_scale}
    return _choose(
        impl,
        (q, k, v, q_positions, kv_lengths),
        kernel=lambda q, k, v, pos, lens, interpret: flash_attention(
            q, k, v, q_positions=pos, kv_lengths=lens, interpret=interpret, **knobs
        ),
        fallback_fn=functools.partial(fallback.blockwise_attention, **knobs),
        reference=lambda q, k, v, pos, lens: flash_attention_reference(
            q, k, v, q_positions=pos, kv_lengths=lens, **knobs
        ),
        kernel_ok=q.shape[-1] <= MAX_HEAD_DIM,
    )


def dense_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    q_positions: jax.Array,  # [B, T] int32
    kv_lengths: jax.Array,  # [B] int32
    *,
    causal: bool,
    sm_scale: float,
    impl: Impl = "auto",
) -> jax.Array:  # [B, T, H, D]
    """Attention over dense K/V (prefill): Pallas flash on GPU, blockwise fallback on CPU.

    Same contract as :func:`ligerjax.kernels.flash_attention`: GQA, causal by absolute
    position (``q_positions``), keys at or past ``kv_lengths`` ignored, rows that see no key 0.
    """
    _check_impl("dense_attention", impl)
    check_attention_args("dense_attention", q, k, v, q_positions, kv_lengths, mixed_dtypes=True)
    return _dense_attention(
        q, k, v, q_positions, kv_lengths, causal=bool(causal), sm_scale=float(sm_scale), impl=impl
    )


def attention_fallback(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    q_positions: jax.Array,  # [B, T] int32
    kv_lengths: jax.Array,  # [B] int32
    *,
    causal: bool,
    sm_scale: float,
    impl: Impl = "auto",
) -> jax.Array:  # [B, T, H, D]
    """What :func:`ligerjax.ops.attention` runs: :func:`dense_attention` for this backend.

    (The name is historical: on CPU this is the blockwise fallback, on GPU the Pallas kernel.)
    """
    return dense_attention(
        q, k, v, q_positions, kv_lengths, causal=causal, sm_scale=sm_scale, impl=impl
    )


def _native(
    kernel: Callable[..., jax.Array], k_pages: jax.Array, sm_scale: float
) -> Callable[..., jax.Array] | None:
    """The C++ kernel for these pages, or None where it does not take them."""
    if not native_supported(k_pages.dtype, k_pages.shape[1]):
        return None
    return functools.partial(kernel, sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl"))
def _paged_decode(q, k_pages, v_pages, block_tables, context_lens, *, sm_scale, impl):
    return _choose(
        impl,
        (q, k_pages, v_pages, block_tables, context_lens),
        kernel=functools.partial(paged_attention, sm_scale=sm_scale),
        fallback_fn=functools.partial(fallback.blockwise_paged_attention, sm_scale=sm_scale),
        reference=functools.partial(paged_attention_reference, sm_scale=sm_scale),
        kernel_ok=pallas_paged_supported(q.shape[-1], k_pages.shape[1]),
        native=_native(native_paged_attention, k_pages, sm_scale),
    )


def paged_decode_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    *,
    sm_scale: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:  # [B, H, D]
    """Decode attention over paged K/V: the Pallas kernel on GPU, block-table gather on CPU.

    Same contract as :func:`ligerjax.kernels.paged_attention`.
    """
    _check_impl("paged_decode_attention", impl)
    check_paged_args(
        "paged_decode_attention",
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        mixed_dtypes=True,
    )
    scale = float(sm_scale) if sm_scale is not None else float(q.shape[-1]) ** -0.5
    return _paged_decode(q, k_pages, v_pages, block_tables, context_lens, sm_scale=scale, impl=impl)


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl"))
def _ragged(q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, *, sm_scale, impl):
    return _choose(
        impl,
        (q, k_pages, v_pages, block_tables, context_lens, cu_q_lens),
        kernel=functools.partial(pallas_ragged_paged_attention, sm_scale=sm_scale),
        fallback_fn=functools.partial(fallback.blockwise_ragged_paged_attention, sm_scale=sm_scale),
        reference=functools.partial(ragged_paged_attention_reference, sm_scale=sm_scale),
        kernel_ok=pallas_paged_supported(q.shape[-1], k_pages.shape[1]),
        native=_native(native_ragged_paged_attention, k_pages, sm_scale),
    )


def ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32, new tokens included
    cu_q_lens: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:  # [T, H, D]
    """Mixed-batch attention (chunked prefill and decode) over paged K/V, for this backend.

    Same contract as :func:`ligerjax.kernels.ragged_paged_attention`; the new tokens' K/V must
    be in the pages already (:func:`write_kv_pages`).
    """
    _check_impl("ragged_paged_attention", impl)
    check_ragged_args(
        "ragged_paged_attention",
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        cu_q_lens,
        mixed_dtypes=True,
    )
    scale = float(sm_scale) if sm_scale is not None else float(q.shape[-1]) ** -0.5
    return _ragged(
        q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, sm_scale=scale, impl=impl
    )
