"""The operators that the compiler recognises by name in a traced program.

Models call :func:`attention` instead of writing softmax(QKᵀ)V by hand, so that the
``attention`` pass finds every attention as one ``pjit`` equation named
``ligerjax_attention`` and can route it to the right kernel.

The static knobs of an attention call survive ``jax.make_jaxpr`` in the jaxpr itself: the
``ligerjax_attention`` equation's body is one ``pjit`` named
``ligerjax_attention.causal_<True|False>.sm_scale_<repr(float)>`` (see
:func:`attention_params_name`), so a pass reads them with :func:`attention_params` instead of
running the body.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ATTENTION_NAME = "ligerjax_attention"
_PARAMS_NAME = re.compile(
    rf"^{ATTENTION_NAME}\.causal_(?P<causal>True|False)\.sm_scale_(?P<sm_scale>[-+0-9.eEinfa]+)$"
)


class AttentionParams(NamedTuple):
    """The static knobs of one ``ligerjax_attention`` call."""

    causal: bool
    sm_scale: float


def attention_params_name(causal: bool, sm_scale: float) -> str:
    """The name of the ``pjit`` that carries ``(causal, sm_scale)`` (``repr`` round-trips)."""
    return f"{ATTENTION_NAME}.causal_{bool(causal)}.sm_scale_{float(sm_scale)!r}"


def parse_attention_params_name(name: str | None) -> AttentionParams | None:
    """``(causal, sm_scale)`` from an :func:`attention_params_name` name; None otherwise."""
    m = _PARAMS_NAME.match(name or "")
    if m is None:
        return None
    return AttentionParams(m["causal"] == "True", float(m["sm_scale"]))


def _call_name(eqn: Any) -> str | None:
    """The ``name`` of a jit equation (read from its params: models import this module, so
    it must not import the compiler)."""
    name = eqn.params.get("name")
    return name if isinstance(name, str) else None


def is_attention(eqn: Any) -> bool:
    """Whether a jaxpr equation is a ``ligerjax_attention`` call (by its pjit name)."""
    name = _call_name(eqn)
    return name == ATTENTION_NAME or parse_attention_params_name(name) is not None


def attention_params(eqn: Any) -> AttentionParams | None:
    """``(causal, sm_scale)`` of a ``ligerjax_attention`` equation, read from the jaxpr.

    None when ``eqn`` is not an attention call or was traced before the knobs were written
    into the jaxpr. Nothing is run.
    """
    name = _call_name(eqn)
    own = parse_attention_params_name(name)
    if own is not None or name != ATTENTION_NAME:
        return own
    body = eqn.params.get("jaxpr")
    if body is None:
        return None
    inner = getattr(body, "jaxpr", body)  # a ClosedJaxpr or a Jaxpr
    found = {parse_attention_params_name(_call_name(e)) for e in inner.eqns}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    *,
    causal: bool = True,
    q_positions: jax.Array | None = None,  # [B, T] int32
    kv_lengths: jax.Array | None = None,  # [B] int32
    sm_scale: float | None = None,
) -> jax.Array:  # [B, T, H, D]
    """Multi-head attention with GQA, absolute-position causal masking and ragged lengths.

    A query at position ``p`` sees keys at positions ``<= p`` (key ``s`` sits at position
    ``s``); ``q_positions`` defaults to ``S - T + arange(T)`` (the queries are the last ``T``
    tokens). Keys at or past ``kv_lengths[b]`` are ignored. Query rows that see no key give 0.
    """
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k {k.shape} / v {v.shape} do not fit q {q.shape}")
    if H % K:
        raise ValueError(f"attention: query heads H={H} not a multiple of kv heads K={K}")
    if q_positions is None:
        q_positions = jnp.broadcast_to(S - T + jnp.arange(T, dtype=jnp.int32), (B, T))
    if kv_lengths is None:
        kv_lengths = jnp.full((B,), S, dtype=jnp.int32)
    scale = float(sm_scale) if sm_scale is not None else D**-0.5
    return _attention_call(q, k, v, q_positions, kv_lengths, causal=causal, sm_scale=scale)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def ligerjax_attention(q, k, v, q_positions, kv_lengths, *, causal, sm_scale):
    """The traced attention call: its jaxpr equation is a ``pjit`` named after this function.

    Its body is one ``pjit`` named :func:`attention_params_name` ``(causal, sm_scale)`` that
    runs :func:`ligerjax.kernels.dispatch.dense_attention` (Pallas flash attention when
    lowered for a GPU, the blockwise fallback on CPU; chosen at lowering time).
    """
    return _dispatched_attention(bool(causal), float(sm_scale))(q, k, v, q_positions, kv_lengths)


@functools.lru_cache(maxsize=256)
def _dispatched_attention(causal: bool, sm_scale: float):
    """The jitted dispatching call, named after its knobs so that they stay readable."""
    from ligerjax.kernels.dispatch import dense_attention

    def run(q, k, v, q_positions, kv_lengths):
        return dense_attention(q, k, v, q_positions, kv_lengths, causal=causal, sm_scale=sm_scale)

    run.__name__ = run.__qualname__ = attention_params_name(causal, sm_scale)
    return jax.jit(run)


_attention_call = ligerjax_attention


RAGGED_PAGED_ATTENTION_NAME = "ligerjax_ragged_paged_attention"


def ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [N, P, K, D]
    v_pages: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32
    cu_q_lens: jax.Array,  # [B + 1] int32
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # [T, H, D]
    """Attention of a mixed batch of packed new tokens against a paged KV cache.

    Sequence ``b``'s queries are ``q[cu_q_lens[b]:cu_q_lens[b+1]]``, its last tokens: with
    ``n`` of them, query ``i`` sits at position ``context_lens[b] - n + i`` and sees the keys
    at positions ``<=`` its own, key ``p`` being slot ``p % P`` of block
    ``block_tables[b, p // P]``. The new tokens' K/V must already be in the pages. Tokens
    past ``cu_q_lens[B]`` are padding and give 0; so do sequences with no queries.
    """
    _, H, D = q.shape
    K = k_pages.shape[2]
    if k_pages.shape != v_pages.shape or k_pages.shape[3] != D:
        raise ValueError(
            f"ragged_paged_attention: pages k {k_pages.shape} / v {v_pages.shape} do not fit "
            f"q {q.shape}"
        )
    if H % K:
        raise ValueError(f"ragged_paged_attention: H={H} not a multiple of kv heads K={K}")
    B = block_tables.shape[0]
    if context_lens.shape != (B,) or cu_q_lens.shape != (B + 1,):
        raise ValueError(
            f"ragged_paged_attention: block_tables {block_tables.shape}, context_lens "
            f"{context_lens.shape} and cu_q_lens {cu_q_lens.shape} disagree on B={B}"
        )
    scale = float(sm_scale) if sm_scale is not None else D**-0.5
    return _ragged_paged_attention_call(
        q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, sm_scale=scale
    )


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def ligerjax_ragged_paged_attention(
    q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, *, sm_scale
):
    """The traced paged-attention call: a ``pjit`` equation named after this function."""
    from ligerjax.kernels.dispatch import ragged_paged_attention as kernel

    return kernel(q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, sm_scale=sm_scale)


_ragged_paged_attention_call = ligerjax_ragged_paged_attention
