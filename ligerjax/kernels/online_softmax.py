"""The key-tile step the Pallas kernels share: FlashAttention-2's online softmax.

A kernel program owns ``R`` query rows and walks their keys ``C`` at a time. The carry is the
running max ``m [R]`` (base 2: logits are scaled by ``sm_scale * log2(e)`` so that ``exp2``
does the exponentials), the running sum ``l [R]`` and the unnormalised output ``acc [R, D]``,
all float32. Tiles wholly inside every row's visible range run without a mask; the rest
(the diagonal, the end of a context) with one. Each kernel supplies how to load its tiles
(contiguous rows, or gathered pages) and which keys a row may see.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
# The running max starts finite, so that exp(m_old - m_new) is never exp(-inf + inf) for a
# row that has seen only masked keys; masked logits are -inf and contribute exactly 0.
M_INIT = -1e30

Carry = tuple[jax.Array, jax.Array, jax.Array]  # running max, running sum, accumulator; f32


def attend_tile(
    carry: Carry,
    q_rd: jax.Array,  # [R, D]
    k_cd: jax.Array,  # [C, D]
    values: Callable[[], jax.Array],  # -> [C, D]
    mask: Callable[[], jax.Array] | None,  # -> [R, C] bool: the keys each row sees
    *,
    sm_scale: float,
    precision: lax.Precision,
) -> Carry:
    """Fold one tile of keys into the carry.

    ``values`` and ``mask`` are called where the step needs them (the values after the
    tile's statistics), so the program keeps the order of its loads: K, then V.
    """
    m_r, l_r, acc_rd = carry
    s_rc = lax.dot_general(
        q_rd,
        k_cd,
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    s_rc = s_rc * (sm_scale * LOG2E)
    if mask is not None:
        s_rc = jnp.where(mask(), s_rc, -jnp.inf)
    m_new = jnp.maximum(m_r, jnp.max(s_rc, axis=1))
    alpha_r = jnp.exp2(m_r - m_new)
    p_rc = jnp.exp2(s_rc - m_new[:, None])
    l_r = alpha_r * l_r + jnp.sum(p_rc, axis=1)
    v_cd = values()
    pv_rd = jnp.dot(
        p_rc.astype(v_cd.dtype),
        v_cd,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return m_new, l_r, acc_rd * alpha_r[:, None] + pv_rd


def attend_key_tiles(
    step: Callable[..., Carry],  # step(j, carry, *, masked: bool) -> carry
    full: jax.Array,
    hi: jax.Array,
    rows: int,
    head_dim: int,
) -> Carry:
    """Run ``step`` over key tiles ``[0, full)`` unmasked, then ``[full, hi)`` masked."""
    carry = (
        jnp.full((rows,), M_INIT, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    return lax.fori_loop(full, hi, functools.partial(step, masked=True), carry)


def normalise(l_r: jax.Array, acc_rd: jax.Array) -> jax.Array:  # [R, D] f32
    """``acc / l``, with 0 for rows that saw no key (``l == 0``)."""
    return acc_rd / jnp.where(l_r == 0, 1.0, l_r)[:, None]
