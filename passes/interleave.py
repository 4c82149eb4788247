"""Interleave: plan which secondary work runs inside which primary window.

Runs Liger's greedy planner (:func:`ligerjax.schedule.interleave_greedy`) over the two
function vectors of an assembled step: the primary's segments in order (its critical
path first), each communication window filled with secondary compute and each compute
window with secondary communication, an op going in only if its contention-inflated
duration fits the room left (``slack`` allows a fractional overrun). A secondary GEMM,
attention or all-reduce that does not fit is cut along its rows at a multiple of
1/``factor`` (an all-reduce's pieces each pay the ring latency again): the
largest head that fits goes in, the tail waits for the next window (Liger's vertical
decomposition; the decompose pass then realises those cuts in the jaxpr). What no window
took runs after the primary's last op, in order. The windows may overrun by a slack sized
so that the primary's latency grows by at most ``max_inflation`` (5% by default), which
also lets an op that cannot be cut and is a little longer than every window go in; one
longer still takes a window of its own (``place_oversized``) rather than hold the whole
secondary back until the primary ends.

The result, a :class:`StepPlan`, refers to the planned (cut) vectors; ``pieces`` maps each
planned secondary op back to the assembled op and the rows it covers.
"""

from __future__ import annotations

import dataclasses

from ligerjax.cost.cost_model import CostModel
from ligerjax.schedule import (
    COMM,
    COMPUTE,
    FunctionVector,
    InterleaveConfig,
    InterleavePlan,
    interleave_greedy,
)
from ligerjax.schedule.function_vector import base_name
from passes.assemble import Assembled


@dataclasses.dataclass(frozen=True)
class Window:
    """One primary segment and the secondary ops placed in it (indices into the vectors)."""

    kind: str  # "comm" or "compute": the primary's kind in this segment
    primary_ops: tuple[int, ...]
    secondary_ops: tuple[int, ...]
    budget_s: float
    used_s: float


@dataclasses.dataclass(frozen=True)
class Piece:
    """A planned secondary op: assembled op ``op``, rows ``[lo, hi)`` (``None``: whole)."""

    op: int
    rows: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The planned step: windows in order, the secondary ops left for after the primary, and
    the planner's knobs it was planned with (``config``)."""

    assembled: Assembled
    config: InterleaveConfig
    plan: InterleavePlan
    windows: tuple[Window, ...]
    tail: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def primary(self) -> FunctionVector:
        return self.plan.schedule.vectors[0]

    @property
    def secondary(self) -> FunctionVector:
        return self.plan.schedule.vectors[1]

    @property
    def factors(self) -> dict[str, int]:
        """Pieces per assembled secondary op that was cut."""
        count: dict[int, int] = {}
        for p in self.pieces:
            if p.rows is not None:
                count[p.op] = count.get(p.op, 0) + 1
        return {self.assembled.secondary[k].name: n for k, n in count.items()}

    @property
    def matched_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(primary collective names, the secondary ops inside it) per filled comm window."""
        return tuple(
            (
                "+".join(self.primary[i].name for i in w.primary_ops),
                tuple(self.secondary[i].name for i in w.secondary_ops),
            )
            for w in self.windows
            if w.kind == COMM.value and w.secondary_ops
        )

    @property
    def coverage(self) -> float:
        """Planned fraction of the primary's communication time filled with compute."""
        return self.plan.coverage


def _pieces(assembled: FunctionVector, planned: FunctionVector) -> tuple[Piece, ...]:
    index = {op.name: k for k, op in enumerate(assembled)}
    out = []
    for op in planned:
        if op.name in index:
            out.append(Piece(index[op.name], None))
        else:
            base, lo = base_name(op)
            out.append(Piece(index[base], (lo, lo + op.rows)))
    return tuple(out)


def slack_for(primary: FunctionVector, max_inflation: float) -> float:
    """The window overrun that spends at most ``max_inflation`` of the primary's solo time
    when every communication window overruns by it."""
    if not max_inflation >= 0:
        raise ValueError(f"max_inflation={max_inflation}: must be >= 0")
    return max_inflation * primary.duration_s / primary.comm_s if primary.comm_s > 0 else 0.0


# Cuts at multiples of 1/64: fine enough that pieces of a prefill's all-reduce fit a decode
# step's compute windows (7B-like on 4xA100-PCIe, 1024 tokens: at 1/16 no piece fitted, all
# four all-reduces ran exposed and steps took 28% longer on average; at 1/64 none did, and
# steps took 5.4% longer). Every piece is priced with its own costs (ring latency, weights
# read again), so a finer grid only offers more heads to choose from.
DEFAULT_FACTOR = 64


def planner_config(
    primary: FunctionVector, *, factor: int = DEFAULT_FACTOR, max_inflation: float = 0.05
) -> InterleaveConfig:
    """The planner's knobs for a step whose primary may be delayed by ``max_inflation`` of
    its solo time: window slack and the plan's delay budget both come from it."""
    return InterleaveConfig(
        factor=factor,
        split_kinds=(COMPUTE, COMM) if factor > 1 else (),
        slack=slack_for(primary, max_inflation),
        place_oversized=True,
        max_delay_s=max_inflation * primary.duration_s,
    )


def interleave(
    asm: Assembled, cost: CostModel, *, factor: int = DEFAULT_FACTOR, max_inflation: float = 0.05
) -> StepPlan:
    """Plan one step of ``asm``'s primary and secondary batches (``factor=1``: no cuts),
    letting the secondary's work delay the primary by at most ``max_inflation`` of its
    solo time (the windows' slack, :func:`slack_for`)."""
    config = planner_config(asm.primary, factor=factor, max_inflation=max_inflation)
    plan = interleave_greedy(asm.primary, [asm.secondary], cost=cost, config=config)
    windows, placed = [], set()
    for seg, fill in zip(asm.primary.segments(), plan.windows, strict=True):
        sec = tuple(ref.op for ref in fill.placed)
        placed.update(sec)
        windows.append(
            Window(
                kind=seg.kind.value,
                primary_ops=tuple(range(seg.start, seg.stop)),
                secondary_ops=sec,
                budget_s=fill.budget_s,
                used_s=fill.used_s,
            )
        )
    planned = plan.schedule.vectors[1]
    tail = tuple(i for i in range(len(planned)) if i not in placed)
    # The planner takes the secondary's ops in order, so the tail follows every placed op.
    assert not placed or not tail or min(tail) > max(placed)
    return StepPlan(
        assembled=asm,
        config=config,
        plan=plan,
        windows=tuple(windows),
        tail=tail,
        pieces=_pieces(asm.secondary, planned),
    )
