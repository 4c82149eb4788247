"""A model's float32 ``nnx.Linear`` weights (and a tied head's embedding) packed for the CPU's
matmul kernel (:mod:`ligerjax.kernels.native_matmul`).

:func:`pack_weights` returns a copy of the module graph in which every plain float32
``nnx.Linear`` is a :class:`PackedLinear` and, with ``tied_head=True``, every ``nnx.Embed`` is a
:class:`PackedEmbed` whose ``attend`` (the tied LM head) runs on packed panels. Calls keep
their signatures and results; the model passed in is not changed. The runner packs once, at
load, so the cost of the layout is paid once and not on every step.

A step's rows are padded to a bucket. The packed products skip the padding: each reads how
many leading rows are live from a :class:`LiveRows` variable shared by all the layers' linears
(the step's tokens) or by the LM head (its sequences), which the runner sets inside every step
with :func:`set_live_rows`; rows past it come out 0 (a padding row's value is never read).
Until set, every row is live.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ligerjax.kernels.native_matmul import pack_weight, packed_matmul

__all__ = [
    "LiveRows",
    "PackedEmbed",
    "PackedLinear",
    "pack_weights",
    "packable",
    "set_live_rows",
]

ALL_ROWS = 2**31 - 1
HEAD = "head"  # LiveRows.role of the LM head's rows; the layers' is TOKENS
TOKENS = "tokens"


class LiveRows(nnx.Variable):
    """How many leading rows of a packed product's input are live (an int32 scalar); ``role``
    says whose rows: the step's tokens or the LM head's sequences."""


class PackedLinear(nnx.Module):
    """``nnx.Linear`` over a packed kernel: ``y = x @ kernel (+ bias)``, float32."""

    def __init__(self, linear: nnx.Linear, live_rows: LiveRows | None = None):
        kernel_kn = linear.kernel[...]
        self.in_features, self.out_features = (int(d) for d in kernel_kn.shape)
        self.kernel_pkc = nnx.Param(pack_weight(kernel_kn))
        self.bias = linear.bias
        self.live_rows = live_rows

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y_mn = _matmul(x, self.kernel_pkc[...], self.out_features, self.live_rows)
        if self.bias is not None:
            y_mn = y_mn + self.bias[...]
        return y_mn


class PackedEmbed(nnx.Module):
    """``nnx.Embed`` whose ``attend`` (logits against every embedding) runs on a packed copy of
    the transposed table; lookups read the table itself."""

    def __init__(self, embed: nnx.Embed, live_rows: LiveRows | None = None):
        self.embed = embed
        self.num_embeddings = int(embed.num_embeddings)
        self.attend_pkc = nnx.Param(pack_weight(embed.embedding[...].T))
        self.live_rows = live_rows

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [...] -> [..., features]
        return self.embed(tokens)

    def attend(self, query: jax.Array) -> jax.Array:  # [..., features] -> [..., num_embeddings]
        return _matmul(query, self.attend_pkc[...], self.num_embeddings, self.live_rows)


def _matmul(x: jax.Array, w_pkc: jax.Array, n: int, live_rows: LiveRows | None) -> jax.Array:
    lead = x.shape[:-1]
    x_mk = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    rows = None if live_rows is None else live_rows[...]
    return packed_matmul(x_mk, w_pkc, n, rows).reshape(*lead, n)


def packable(module: Any) -> bool:
    """A plain float32 ``nnx.Linear`` (no custom dot product, no reduced-precision compute)."""
    if type(module) is not nnx.Linear:
        return False
    f32 = jnp.dtype(jnp.float32)
    return (
        module.kernel[...].dtype == f32
        and module.dtype in (None, f32)
        and module.dot_general is jax.lax.dot_general
        and module.preferred_element_type in (None, f32)
    )


def pack_weights(model: nnx.Module, *, tied_head: bool = False) -> nnx.Module:
    """A copy of ``model`` (sharing its other arrays) with its packable linears packed, and its
    float32 embeddings too when ``tied_head`` (their ``attend`` is the LM head). A linear named
    ``lm_head`` counts the head's rows, the others the step's tokens (see the module doc)."""
    graphdef, state = nnx.split(model)
    packed = nnx.merge(graphdef, state)  # new modules over the same arrays
    tokens = LiveRows(jnp.asarray(ALL_ROWS, jnp.int32), role=TOKENS)
    head = LiveRows(jnp.asarray(ALL_ROWS, jnp.int32), role=HEAD)
    swaps: list[tuple[Sequence[Any], nnx.Module]] = []
    for path, node in nnx.iter_graph(packed):
        if packable(node):
            is_head = bool(path) and path[-1] == "lm_head"
            swaps.append((path, PackedLinear(node, head if is_head else tokens)))
        elif tied_head and type(node) is nnx.Embed and node.embedding[...].dtype == jnp.float32:
            swaps.append((path, PackedEmbed(node, head)))
    for where, new in swaps:
        path = tuple(where)
        if not path:
            return new
        parent: Any = packed
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, str(key))
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, str(path[-1]), new)
    return packed


def set_live_rows(model: Any, *, tokens: jax.Array | int, head: jax.Array | int) -> None:
    """Mark the live rows of a packed model's products (inside a traced step: the values may
    be tracers): ``tokens`` for the layers, ``head`` for the LM head. A model without packed
    products is left as it is."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LiveRows):
            node.set_value(jnp.asarray(head if node.role == HEAD else tokens, jnp.int32))
