"""A model's float32 ``nnx.Linear`` weights (and a tied head's embedding) packed for the CPU's
matmul kernel (:mod:`ligerjax.kernels.native_matmul`).

:func:`pack_weights` returns a copy of the module graph in which every plain float32
``nnx.Linear`` is a :class:`PackedLinear` and, with ``tied_head=True``, every ``nnx.Embed`` is a
:class:`PackedEmbed` whose ``attend`` (the tied LM head) runs on packed panels. Calls keep
their signatures and results; the model passed in is not changed. The runner packs once, at
load, so the cost of the layout is paid once and not on every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ligerjax.kernels.native_matmul import pack_weight, packed_matmul

__all__ = ["PackedEmbed", "PackedLinear", "pack_weights", "packable"]


class PackedLinear(nnx.Module):
    """``nnx.Linear`` over a packed kernel: ``y = x @ kernel (+ bias)``, float32."""

    def __init__(self, linear: nnx.Linear):
        kernel_kn = linear.kernel[...]
        self.in_features, self.out_features = (int(d) for d in kernel_kn.shape)
        self.kernel_pkc = nnx.Param(pack_weight(kernel_kn))
        self.bias = linear.bias

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y_mn = _matmul(x, self.kernel_pkc[...], self.out_features)
        if self.bias is not None:
            y_mn = y_mn + self.bias[...]
        return y_mn


class PackedEmbed(nnx.Module):
    """``nnx.Embed`` whose ``attend`` (logits against every embedding) runs on a packed copy of
    the transposed table; lookups read the table itself."""

    def __init__(self, embed: nnx.Embed):
        self.embed = embed
        self.num_embeddings = int(embed.num_embeddings)
        self.attend_pkc = nnx.Param(pack_weight(embed.embedding[...].T))

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [...] -> [..., features]
        return self.embed(tokens)

    def attend(self, query: jax.Array) -> jax.Array:  # [..., features] -> [..., num_embeddings]
        return _matmul(query, self.attend_pkc[...], self.num_embeddings)


def _matmul(x: jax.Array, w_pkc: jax.Array, n: int) -> jax.Array:
    lead = x.shape[:-1]
    x_mk = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    return packed_matmul(x_mk, w_pkc, n).reshape(*lead, n)


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
    float32 embeddings too when ``tied_head`` (their ``attend`` is the LM head)."""
    graphdef, state = nnx.split(model)
    packed = nnx.merge(graphdef, state)  # new modules over the same arrays
    swaps: list[tuple[Sequence[Any], nnx.Module]] = []
    for path, node in nnx.iter_graph(packed):
        if packable(node):
            swaps.append((path, PackedLinear(node)))
        elif tied_head and type(node) is nnx.Embed and node.embedding[...].dtype == jnp.float32:
            swaps.append((path, PackedEmbed(node)))
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
