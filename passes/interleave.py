"""Interleave: plan which secondary ops run inside which primary window.

Runs Liger's greedy planner (:func:`ligerjax.schedule.interleave_greedy`) over the two
function vectors of an assembled step: the primary's segments in order (its critical
path first), each communication window filled with secondary compute and each compute
window with secondary communication, an op going in only if its contention-inflated
duration fits the room left (``slack`` allows a fractional overrun). The decompose pass
has already cut large ops to window size, so the planner does not cut further. What no
window took runs after the primary's last op, in order.

The result, a :class:`StepPlan`, names equations, not ops: it is what the emit pass
realises on XLA.
"""

from __future__ import annotations

import dataclasses

from ligerjax.cost.cost_model import CostModel
from ligerjax.schedule import COMM, InterleaveConfig, InterleavePlan, interleave_greedy
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
class StepPlan:
    """The planned step: windows in order, the secondary ops left for after the primary."""

    assembled: Assembled
    plan: InterleavePlan
    windows: tuple[Window, ...]
    tail: tuple[int, ...]

    @property
    def matched_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(primary collective names, the secondary ops inside it) per filled comm window."""
        asm = self.assembled
        return tuple(
            (
                "+".join(asm.primary[i].name for i in w.primary_ops),
                tuple(asm.secondary[i].name for i in w.secondary_ops),
            )
            for w in self.windows
            if w.kind == COMM.value and w.secondary_ops
        )

    @property
    def coverage(self) -> float:
        """Planned fraction of the primary's communication time filled with compute."""
        return self.plan.coverage


def interleave(asm: Assembled, cost: CostModel, *, slack: float = 0.0) -> StepPlan:
    """Plan one step of ``asm``'s primary and secondary batches."""
    config = InterleaveConfig(factor=1, split_kinds=(), slack=slack)
    plan = interleave_greedy(asm.primary, [asm.secondary], cost=cost, config=config)
    segments = asm.primary.segments()
    windows, placed = [], set()
    for seg, fill in zip(segments, plan.windows, strict=True):
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
    tail = tuple(i for i in range(len(asm.secondary)) if i not in placed)
    # The planner takes each secondary's ops in order, so the tail follows every placed op.
    assert not placed or not tail or min(tail) > max(placed)
    return StepPlan(assembled=asm, plan=plan, windows=tuple(windows), tail=tail)
