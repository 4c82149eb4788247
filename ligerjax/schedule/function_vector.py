"""Function vectors: a batch's step as a flat list of ops tagged COMPUTE or COMM.

Liger's function assembler linearises a model step into a vector of kernel launches, each
with its kind (computation or communication), its estimated duration and what it moves and
computes. The switch points, where compute turns to communication, open the windows in
which another batch's compute can run. The compiler's assemble pass builds these from a
jaxpr; :mod:`ligerjax.schedule.liger_workloads` builds them analytically.

Vertical decomposition splits an op along its batch/sequence dimension (``rows``, never the
hidden dimension): each piece keeps the op's fixed traffic (weights, K/V: ``fixed_bytes``)
and gets a share of the rest and of the FLOPs, so small pieces cost more in all.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from ligerjax.cost.cost_model import COLLECTIVES, CostModel

BatchRole = Literal["primary", "secondary"]
PRIMARY: Final = "primary"
SECONDARY: Final = "secondary"


class OpKind(enum.Enum):
    """What an op occupies: the compute units or the interconnect."""

    COMPUTE = "compute"
    COMM = "comm"


COMPUTE = OpKind.COMPUTE
COMM = OpKind.COMM


@dataclass(frozen=True, slots=True)
class Op:
    """One kernel of a function vector: ``Op(name, kind, flops, bytes, duration_s, batch,
    layer, ...)``.

    ``duration_s`` is its solo duration (no contention); ``batch`` tags it primary or
    secondary. ``rows`` is the extent of the
    dimension it may be split along (tokens or sequences; 0: not splittable) and
    ``fixed_bytes`` the part of ``bytes`` every piece still moves. ``collective`` and
    ``group`` describe a COMM op (``all_reduce`` over ``group`` devices, ...). ``device``
    picks the device whose streams run it (a pipeline stage); tensor-parallel peers run in
    lock-step and are represented by device 0.
    """

    name: str
    kind: OpKind
    flops: float = 0.0
    bytes: float = 0.0
    duration_s: float = 0.0
    batch: BatchRole = PRIMARY
    layer: int = -1
    device: int = 0
    rows: int = 0
    fixed_bytes: float = 0.0
    dtype: str = "float16"
    collective: str = ""
    group: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.kind, OpKind):
            raise ValueError(f"Op({self.name}).kind={self.kind!r}: must be COMPUTE or COMM")
        for name in ("duration_s", "flops", "bytes", "fixed_bytes"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"Op({self.name}).{name}={value}: must be >= 0")
        if self.fixed_bytes > self.bytes:
            raise ValueError(
                f"Op({self.name}).fixed_bytes={self.fixed_bytes}: more than bytes={self.bytes}"
            )
        if self.batch not in (PRIMARY, SECONDARY):
            raise ValueError(f"Op({self.name}).batch={self.batch!r}: 'primary' or 'secondary'")
        if self.rows < 0:
            raise ValueError(f"Op({self.name}).rows={self.rows}: must be >= 0")
        if self.device < 0:
            raise ValueError(f"Op({self.name}).device={self.device}: must be >= 0")
        if self.group < 1:
            raise ValueError(f"Op({self.name}).group={self.group}: must be >= 1")
        if self.collective and self.collective not in COLLECTIVES:
            raise ValueError(
                f"Op({self.name}).collective={self.collective!r}: one of {', '.join(COLLECTIVES)}"
            )

    @property
    def splittable(self) -> bool:
        """Whether the op can be cut into pieces along ``rows``."""
        return self.rows > 1

    def replace(self, **changes: Any) -> Op:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Segment:
    """A maximal run of ops of one kind: ``ops[start:stop]`` of a vector."""

    kind: OpKind
    start: int
    stop: int
    duration_s: float


@dataclass(frozen=True)
class FunctionVector:
    """The ops of one batch's step, in execution order (each depends on the one before).

    ``tokens`` (optional) is what the batch computes, for throughput in tokens/s.
    """

    ops: tuple[Op, ...]
    name: str = ""
    tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        for i, op in enumerate(self.ops):
            if not isinstance(op, Op):
                raise ValueError(f"FunctionVector({self.name}).ops[{i}]={op!r}: not an Op")
        if self.tokens < 0:
            raise ValueError(f"FunctionVector({self.name}).tokens={self.tokens}: must be >= 0")

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __getitem__(self, index: int) -> Op:
        return self.ops[index]

    def switch_points(self) -> tuple[int, ...]:
        """Indices ``i`` where ``ops[i-1]`` computes and ``ops[i]`` communicates."""
        ops = self.ops
        return tuple(
            i for i in range(1, len(ops)) if ops[i - 1].kind is COMPUTE and ops[i].kind is COMM
        )

    def segments(self) -> tuple[Segment, ...]:
        """The maximal same-kind runs, in order: the windows a planner fills."""
        out: list[Segment] = []
        start = 0
        for i in range(1, len(self.ops) + 1):
            if i == len(self.ops) or self.ops[i].kind is not self.ops[start].kind:
                dur = math.fsum(op.duration_s for op in self.ops[start:i])
                out.append(Segment(self.ops[start].kind, start, i, dur))
                start = i
        return tuple(out)

    @property
    def duration_s(self) -> float:
        """Solo duration: the sum of its ops."""
        return math.fsum(op.duration_s for op in self.ops)

    @property
    def compute_s(self) -> float:
        """Solo time of its COMPUTE ops."""
        return math.fsum(op.duration_s for op in self.ops if op.kind is COMPUTE)

    @property
    def comm_s(self) -> float:
        """Solo time of its COMM ops."""
        return math.fsum(op.duration_s for op in self.ops if op.kind is COMM)

    def as_batch(self, role: BatchRole) -> FunctionVector:
        """The same vector with every op tagged ``role``."""
        return dataclasses.replace(self, ops=tuple(op.replace(batch=role) for op in self.ops))


# -- vertical decomposition ------------------------------------------------------------------


def _piece_cost(op: Op, rows: int, cost: CostModel | None) -> tuple[float, float, float]:
    """(duration, flops, bytes) of a ``rows``-row piece of ``op``."""
    frac = rows / op.rows
    flops = op.flops * frac
    nbytes = op.fixed_bytes + (op.bytes - op.fixed_bytes) * frac
    if cost is not None and (op.flops > 0 or op.bytes > 0):
        if op.kind is COMPUTE:
            return cost.op_duration(flops, nbytes, op.dtype), flops, nbytes
        return cost.comm_duration(op.collective or "all_reduce", nbytes, op.group), flops, nbytes
    return op.duration_s * frac, flops, nbytes  # no roofline data: scale with the rows


def piece_duration(op: Op, rows: int, cost: CostModel | None = None) -> float:
    """Solo duration of the first ``rows`` rows of ``op`` cut off as their own op."""
    if not 0 < rows <= op.rows:
        raise ValueError(f"rows={rows}: must be in [1, {op.rows}] for Op({op.name})")
    return _piece_cost(op, rows, cost)[0]


def _piece(op: Op, lo: int, hi: int, cost: CostModel | None) -> Op:
    duration, flops, nbytes = _piece_cost(op, hi - lo, cost)
    base, offset = base_name(op)
    return op.replace(
        name=f"{base}[{offset + lo}:{offset + hi}]",
        duration_s=duration,
        flops=flops,
        bytes=nbytes,
        rows=hi - lo,
    )


def base_name(op: Op) -> tuple[str, int]:
    """Name and row offset of ``op`` within the op it was cut from (``qkv[8:16]`` -> 8)."""
    name = op.name
    if name.endswith("]") and "[" in name:
        base, _, span = name[:-1].rpartition("[")
        lo, sep, _ = span.partition(":")
        if sep and lo.isdigit():
            return base, int(lo)
    return name, 0


def split_op(op: Op, rows: int, cost: CostModel | None = None) -> tuple[Op, Op]:
    """Cut ``op`` after its first ``rows`` rows: (head, tail). With ``cost``, each piece's
    duration is its own roofline (or collective) time; without, it scales with its rows."""
    if not op.splittable:
        raise ValueError(f"Op({op.name}).rows={op.rows}: cannot be split")
    if not 0 < rows < op.rows:
        raise ValueError(f"rows={rows}: must be in [1, {op.rows - 1}] for Op({op.name})")
    return _piece(op, 0, rows, cost), _piece(op, rows, op.rows, cost)


def decompose(op: Op, k: int, cost: CostModel | None = None) -> tuple[Op, ...]:
    """Cut ``op`` into ``k`` pieces of near-equal rows (``k`` at most ``op.rows``)."""
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    if k == 1:
        return (op,)
    if k > op.rows:
        raise ValueError(f"k={k}: more pieces than Op({op.name}).rows={op.rows}")
    bounds = [round(i * op.rows / k) for i in range(k + 1)]
    return tuple(_piece(op, lo, hi, cost) for lo, hi in itertools.pairwise(bounds))
