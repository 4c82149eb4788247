"""The function assembler: a per-device jaxpr of two batches → their function vectors.

The input is the per-device jaxpr of one step that computes a primary and a secondary
batch with shared weights (the tensor-parallel pass's output for ``(f(p), f(s))``). Each
equation gets the role of the batch whose arguments it depends on (``shared`` when it
depends on neither, e.g. a table computed from constants; an equation that mixes both
batches is an error: they must be independent). Then each batch's equations become a
:class:`~ligerjax.schedule.FunctionVector`, as Liger's assembler linearises kernel
launches:

- anchors are ops of their own: every ``dot_general``, every named attention call, every
  collective (COMM);
- the equations between two anchors fuse into one COMPUTE op (XLA fuses them into one
  kernel), whose bytes are the values crossing the fusion's boundary.

Durations come from the cost model's roofline (``op_duration``) and ring collectives
(``comm_duration``); ``Assembled.members`` maps each op back to its equations, which is
what the interleave and emit passes schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import jax.numpy as jnp
import numpy as np

from ligerjax.compiler import ir
from ligerjax.cost.cost_model import CostModel
from ligerjax.ops import ATTENTION_NAME
from ligerjax.schedule import COMM, COMPUTE, PRIMARY, SECONDARY, FunctionVector, Op

SHARED: Final = "shared"

# Collective primitive → (cost-model collective, whether its output is what moves).
COLLECTIVES: Mapping[str, str] = {
    "psum": "all_reduce",
    "pmax": "all_reduce",
    "pmin": "all_reduce",
    "all_gather": "all_gather",
    "psum_scatter": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "ppermute": "permute",
}


def nbytes(aval: Any) -> int:
    """Bytes of a value of abstract value ``aval``."""
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _dtype(eqn: ir.JaxprEqn) -> str:
    avals = [ir.aval_of(v) for v in eqn.invars if hasattr(ir.aval_of(v), "dtype")]
    floats = [a.dtype for a in avals if jnp.issubdtype(a.dtype, jnp.floating)]
    return str(np.dtype(floats[0])) if floats else "float32"


# Ops that read only the part of an operand they return (an embedding row, a cache slot).
_READS_ITS_OUTPUT = frozenset({"gather", "dynamic_slice", "slice"})


def is_anchor(eqn: ir.JaxprEqn) -> bool:
    """Whether ``eqn`` is a kernel of its own (GEMM, attention, collective)."""
    return (
        eqn.primitive.name == "dot_general"
        or eqn.primitive.name in COLLECTIVES
        or ir.eqn_name(eqn) == ATTENTION_NAME
    )


def _bytes_read(eqn: ir.JaxprEqn, pos: int) -> int:
    """Bytes ``eqn`` reads of its operand ``pos``: all of it, except what a gather or slice
    picks out (looking through calls)."""
    full = nbytes(ir.aval_of(eqn.invars[pos]))
    if eqn.primitive.name in _READS_ITS_OUTPUT:
        return min(full, sum(nbytes(o.aval) for o in eqn.outvars)) if pos == 0 else full
    body = ir.call_jaxpr(eqn)
    if body is None or len(body.jaxpr.invars) != len(eqn.invars):
        return full
    inner = body.jaxpr.invars[pos]
    if inner in body.jaxpr.outvars:
        return full
    parts = [
        _bytes_read(e, k)
        for e in body.jaxpr.eqns
        for k, v in enumerate(e.invars)
        if not ir.is_literal(v) and v is inner
    ]
    return min(full, max(parts, default=0))


def dot_flops(eqn: ir.JaxprEqn) -> float:
    """2·M·N·K of a ``dot_general``: two FLOPs per output element per contracted element."""
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = ir.aval_of(eqn.invars[0])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc)


def eqn_flops(eqn: ir.JaxprEqn) -> float:
    """FLOPs of one equation: 2·M·N·K for a GEMM, 4·B·T·S·H·D for attention, else one
    per output element (recursing into calls)."""
    name = eqn.primitive.name
    if name == "dot_general":
        return dot_flops(eqn)
    if ir.eqn_name(eqn) == ATTENTION_NAME:
        B, T, H, D = ir.aval_of(eqn.invars[0]).shape
        S = ir.aval_of(eqn.invars[1]).shape[1]
        return 4.0 * B * T * S * H * D
    if name in COLLECTIVES:
        return 0.0
    body = ir.call_jaxpr(eqn)
    if body is not None:
        return sum(eqn_flops(e) for e in body.jaxpr.eqns)
    return float(sum(math.prod(v.aval.shape) for v in eqn.outvars))


def batch_roles(jaxpr: ir.ClosedJaxpr, input_roles: Sequence[str | None]) -> tuple[str, ...]:
    """The role of each equation: the batch whose inputs it reads (``shared``: none).

    ``input_roles[i]`` is ``"primary"``, ``"secondary"`` or None (a weight) for invar i.
    Raises ValueError naming the equation when one reads both batches.
    """
    j = jaxpr.jaxpr
    if len(input_roles) != len(j.invars):
        raise ValueError(f"input_roles: {len(input_roles)} roles for {len(j.invars)} inputs")
    role: dict[Any, str | None] = dict(zip(j.invars, input_roles, strict=True))
    out = []
    for i, eqn in enumerate(j.eqns):
        seen = {role.get(v) for v in eqn.invars if not ir.is_literal(v)} - {None, SHARED}
        if len(seen) > 1:
            raise ValueError(
                f"equation {i} ({eqn.primitive.name}) reads both the primary and the "
                "secondary batch: the two batches must be independent"
            )
        r = seen.pop() if seen else SHARED
        for v in eqn.outvars:
            role[v] = r
        out.append(r)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Assembled:
    """Function vectors of a two-batch jaxpr and the equations behind each op.

    ``members[role][k]`` are the equation indices of op ``k`` of ``vectors[role]``;
    ``roles[i]`` is equation i's batch; ``weights`` marks the invars that are weights.
    """

    jaxpr: ir.ClosedJaxpr
    roles: tuple[str, ...]
    vectors: Mapping[str, FunctionVector]
    members: Mapping[str, tuple[tuple[int, ...], ...]]
    num_weights: int

    @property
    def primary(self) -> FunctionVector:
        return self.vectors[PRIMARY]

    @property
    def secondary(self) -> FunctionVector:
        return self.vectors[SECONDARY]


class Uses:
    """Which equations read each var (and whether the jaxpr returns it)."""

    def __init__(self, j: ir.Jaxpr) -> None:
        self.readers: dict[Any, set[int]] = {}
        for i, eqn in enumerate(j.eqns):
            for v in eqn.invars:
                if not ir.is_literal(v):
                    self.readers.setdefault(v, set()).add(i)
        self.outs = {v for v in j.outvars if not ir.is_literal(v)}

    def escapes(self, v: Any, group: set[int]) -> bool:
        return v in self.outs or bool(self.readers.get(v, set()) - group)


def _rows(eqn: ir.JaxprEqn, weights: set[Any]) -> int:
    """Extent of the dimension a GEMM, attention or all-reduce may be cut along (0: not
    splittable)."""
    if ir.eqn_name(eqn) == ATTENTION_NAME:
        return int(ir.aval_of(eqn.invars[0]).shape[1])  # query tokens T
    is_dot = eqn.primitive.name == "dot_general"
    dim = row_dim(eqn, weights) if is_dot else collective_row_dim(eqn)
    return 0 if dim is None else int(ir.aval_of(eqn.invars[0]).shape[dim])


# Elementwise reductions over devices: any row slice of the operand reduces on its own.
ROW_SPLIT_COLLECTIVES = frozenset({"psum", "pmax", "pmin"})


def collective_row_dim(eqn: ir.JaxprEqn) -> int | None:
    """The operand dimension an all-reduce may be cut along: its largest dimension other
    than the last (``None`` for other collectives, several operands, or a vector)."""
    if eqn.primitive.name not in ROW_SPLIT_COLLECTIVES or len(eqn.invars) != 1:
        return None
    shape = ir.aval_of(eqn.invars[0]).shape
    if len(shape) < 2:
        return None
    return max(range(len(shape) - 1), key=lambda d: (shape[d], -d))


def row_dim(eqn: ir.JaxprEqn, weights: set[Any]) -> int | None:
    """The lhs dimension of an activation × weight GEMM to cut along: its largest free
    (neither contracting nor batch) dimension other than the last (never the hidden one)."""
    lhs, rhs = eqn.invars
    if ir.is_literal(lhs) or lhs in weights or (not ir.is_literal(rhs) and rhs not in weights):
        return None
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    shape = ir.aval_of(lhs).shape
    free = [d for d in range(len(shape) - 1) if d not in lc and d not in lb]
    if not free:
        return None
    return max(free, key=lambda d: (shape[d], -d))


def _op_of(
    name: str,
    group: Sequence[int],
    j: ir.Jaxpr,
    uses: Uses,
    weights: set[Any],
    cost: CostModel,
    axis_sizes: Mapping[str, int],
    role: str,
) -> Op:
    eqns = [j.eqns[i] for i in group]
    members = set(group)
    defined = {v for e in eqns for v in e.outvars}
    read: dict[Any, int] = {}  # input var -> bytes the group reads of it
    for e in eqns:
        for pos, v in enumerate(e.invars):
            if ir.is_literal(v) or v in defined:
                continue
            read[v] = max(read.get(v, 0), _bytes_read(e, pos))
    outs = {v for v in defined if uses.escapes(v, members)}
    fixed = sum(b for v, b in read.items() if v in weights)
    traffic = sum(read.values()) + sum(nbytes(v.aval) for v in outs)
    first = eqns[0]
    batch = PRIMARY if role == SHARED else role
    coll = COLLECTIVES.get(first.primitive.name)
    if coll is not None:
        n = math.prod(axis_sizes[a] for a in _axes(first))
        moved = sum(nbytes(v.aval) for v in first.outvars)
        return Op(
            name,
            COMM,
            bytes=moved,
            duration_s=cost.comm_duration(coll, moved, n),
            batch=batch,
            rows=_rows(first, weights) if len(eqns) == 1 else 0,
            collective=coll,
            group=n,
        )
    flops = math.fsum(eqn_flops(e) for e in eqns)
    dtype = _dtype(first)
    return Op(
        name,
        COMPUTE,
        flops=flops,
        bytes=traffic,
        duration_s=cost.op_duration(flops, traffic, dtype),
        batch=batch,
        rows=_rows(first, weights) if is_anchor(first) else 0,
        fixed_bytes=fixed,
        dtype=dtype,
    )


def _axes(eqn: ir.JaxprEqn) -> tuple[str, ...]:
    axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def assemble(
    jaxpr: ir.ClosedJaxpr,
    input_roles: Sequence[str | None],
    cost: CostModel,
    axis_sizes: Mapping[str, int],
) -> Assembled:
    """Linearise a two-batch per-device jaxpr into one function vector per batch.

    ``input_roles`` tags each invar (None for weights); ``axis_sizes`` gives the size of
    each mesh axis a collective may name. Shared equations join the primary's vector.
    """
    j = jaxpr.jaxpr
    roles = batch_roles(jaxpr, input_roles)
    weights = {v for v, r in zip(j.invars, input_roles, strict=True) if r is None}
    uses = Uses(j)
    groups: dict[str, list[list[int]]] = {PRIMARY: [], SECONDARY: []}
    open_group: dict[str, list[int]] = {PRIMARY: [], SECONDARY: []}
    for i, (eqn, r) in enumerate(zip(j.eqns, roles, strict=True)):
        batch = PRIMARY if r == SHARED else r
        if is_anchor(eqn):
            if open_group[batch]:
                groups[batch].append(open_group[batch])
                open_group[batch] = []
            groups[batch].append([i])
        else:
            open_group[batch].append(i)
    for batch, rest in open_group.items():
        if rest:
            groups[batch].append(rest)
    vectors, members = {}, {}
    for batch, gs in groups.items():
        ops = []
        for k, g in enumerate(gs):
            head = j.eqns[g[0]]
            label = ir.eqn_name(head) or head.primitive.name
            name = f"{batch[0]}{k}:{label}" if len(g) == 1 else f"{batch[0]}{k}:fusion"
            ops.append(_op_of(name, g, j, uses, weights, cost, axis_sizes, roles[g[0]]))
        vectors[batch] = FunctionVector(tuple(ops), name=batch)
        members[batch] = tuple(tuple(g) for g in gs)
    return Assembled(
        jaxpr=jaxpr,
        roles=roles,
        vectors=vectors,
        members=members,
        num_weights=len(weights),
    )
