"""Argument checks shared by the kernels: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
INT32 = jnp.dtype(jnp.int32)


def check_rank(fn: str, name: str, x: jax.Array, dims: str) -> None:
    """``x`` has ``len(dims)`` axes (``dims`` spells them, e.g. ``"BTHD"``)."""
    if jnp.ndim(x) != len(dims):
        raise ValueError(f"{fn}: {name} has shape {jnp.shape(x)}; expected [{', '.join(dims)}]")


def check_float(fn: str, name: str, x: jax.Array) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: {name} has dtype {x.dtype}; expected float32, bfloat16 or float16")


def check_int32(fn: str, name: str, x: jax.Array) -> None:
    if jnp.dtype(x.dtype) != INT32:
        raise ValueError(f"{fn}: {name} has dtype {x.dtype}; expected int32")


def check_same_dtype(fn: str, names: Sequence[str], xs: Sequence[jax.Array]) -> None:
    dtypes = {jnp.dtype(x.dtype) for x in xs}
    if len(dtypes) != 1:
        found = ", ".join(f"{n}={x.dtype}" for n, x in zip(names, xs, strict=True))
        raise ValueError(f"{fn}: {names[-1]} dtype differs from {names[0]} ({found})")


def check_shape(fn: str, name: str, x: jax.Array, expected: tuple[int, ...], dims: str) -> None:
    if tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(
            f"{fn}: {name} has shape {jnp.shape(x)}; expected {tuple(expected)} [{', '.join(dims)}]"
        )


def check_heads(fn: str, num_q_heads: int, num_kv_heads: int, kv_name: str) -> None:
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{fn}: {kv_name} has {num_kv_heads} KV heads; the {num_q_heads} query heads of q "
            "must be a multiple of it"
        )


def check_sm_scale(fn: str, sm_scale: float | None, head_dim: int) -> float:
    """``sm_scale`` as a Python float (``1/sqrt(D)`` by default)."""
    if sm_scale is None:
        return float(head_dim) ** -0.5
    try:
        scale = float(sm_scale)
    except TypeError as e:
        raise ValueError(f"{fn}: sm_scale={sm_scale!r} must be a Python number") from e
    if not np.isfinite(scale):
        raise ValueError(f"{fn}: sm_scale={sm_scale!r} must be finite")
    return scale


def concrete(x: jax.Array) -> np.ndarray | None:
    """The value of ``x`` when it is known now (not traced), else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_values_in_range(fn: str, name: str, x: jax.Array, lo: int, hi: int) -> None:
    """When ``x`` is concrete, every entry lies in ``[lo, hi)``."""
    values = concrete(x)
    if values is None or values.size == 0:
        return
    bad = (values < lo) | (values >= hi)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{fn}: {name}{list(first)}={int(values[first])} is out of range [{lo}, {hi})"
        )
