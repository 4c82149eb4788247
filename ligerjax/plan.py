"""What ``Ligerized.plan`` returns: a compiled interleaved step, as printable data.

A :class:`Schedule` holds the two batches' function vectors, the primary's switch points,
which secondary ops the plan put inside which primary collective (matched pairs), the
decomposition factors, the predicted timelines (interleaved, and the two batches one after
the other), the sustained figures of the secondary carried over steps until it is done,
and what XLA actually did: the scheduled HLO text and the overlap coverage read back from
it with cost-model durations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ligerjax.schedule import FunctionVector, SustainedRun, Timeline


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One planned and compiled interleaved step on ``target`` with ``num_devices``.

    ``overlap_coverage`` is Σ over the primary's collectives of min(its duration, the
    duration of the compute XLA scheduled between its start and done) / Σ of their
    durations, from the compiled schedule in ``hlo_text``; ``coverage`` holds the
    per-collective records. ``planned_coverage`` is the planner's own figure.
    ``sustained``: the secondary carried step after step until done, the throughput a
    server would see (one step only meets the first of a prefill's work).
    """

    target: str
    num_devices: int
    primary: FunctionVector
    secondary: FunctionVector
    switch_points: tuple[int, ...]
    matched_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    decomposition: Mapping[str, int]
    timeline: Timeline
    sequential: Timeline
    hlo_text: str
    coverage: Any  # ligerjax.schedule.hlo_schedule.Coverage
    planned_coverage: float
    compile_s: float
    sustained: SustainedRun
    barriers: bool = True

    @property
    def overlap_coverage(self) -> float:
        """Fraction of the primary's collective time covered by secondary compute in the
        compiled schedule."""
        return float(self.coverage.coverage)

    @property
    def step_s(self) -> float:
        """Predicted duration of the interleaved step."""
        return self.timeline.makespan_s

    @property
    def sequential_s(self) -> float:
        """Predicted duration of the primary then the secondary, not overlapped."""
        return self.sequential.makespan_s

    @property
    def primary_latency_inflation(self) -> float:
        """Predicted primary latency interleaved over its latency alone, minus one."""
        alone = self.primary.duration_s
        return self.timeline.primary_latency / alone - 1 if alone > 0 else 0.0

    @property
    def speedup(self) -> float:
        """Predicted sequential step time over interleaved step time."""
        return self.sequential_s / self.step_s if self.step_s > 0 else 0.0

    def pprint(self) -> str:
        """A human-readable summary (also returned, for logging)."""
        lines = [
            f"ligerjax plan: target={self.target} devices={self.num_devices} "
            f"barriers={self.barriers}",
            f"  primary:   {len(self.primary)} ops, {_us(self.primary.compute_s)} compute, "
            f"{_us(self.primary.comm_s)} comm, switch points {list(self.switch_points)}",
            f"  secondary: {len(self.secondary)} ops, {_us(self.secondary.compute_s)} compute, "
            f"{_us(self.secondary.comm_s)} comm",
            f"  decomposed: {dict(self.decomposition) or 'nothing'}",
            f"  predicted: step {_us(self.step_s)} vs sequential {_us(self.sequential_s)} "
            f"({self.speedup:.2f}x), primary latency +{100 * self.primary_latency_inflation:.1f}%",
            f"  sustained: {self.sustained.ratio:.3f}x over {self.sustained.steps} steps "
            f"({self.sustained.exposed} ops exposed), step time "
            f"+{100 * self.sustained.mean_inflation:.1f}% mean, "
            f"+{100 * self.sustained.worst_inflation:.1f}% worst",
            f"  coverage: planned {self.planned_coverage:.2f}, compiled {self.overlap_coverage:.2f}"
            f" (compile {self.compile_s:.1f} s)",
        ]
        for rec in (r for r in self.coverage.records if r.selected):
            lines.append(
                f"    {rec.name:<28} {'async' if rec.is_async else 'sync ':<5} "
                f"{_us(rec.duration_s):>10} covered {_us(rec.covered_s):>10} "
                f"by {len(rec.compute_names)} ops"
            )
        for coll, pieces in self.matched_pairs:
            lines.append(f"    plan: {coll} <- {', '.join(pieces)}")
        text = "\n".join(lines)
        print(text)
        return text

    def to_chrome_trace(self, path: str | Path) -> Path:
        """The predicted interleaved timeline as Chrome-trace JSON (open in Perfetto)."""
        return self.timeline.to_chrome_trace(path)

    def plot(self, path: str | Path) -> Path:
        """The predicted interleaved timeline as a PNG."""
        title = (
            f"{self.target} x{self.num_devices}: step {_us(self.step_s)}, "
            f"coverage {self.overlap_coverage:.2f}"
        )
        return self.timeline.plot(path, title=title)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"
