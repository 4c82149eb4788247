"""Simulate a schedule of function vectors on compute and communication streams.

A :class:`Schedule` is data: the vectors (after any decomposition), one launch order over
all their ops, each vector's release time (when its request arrives) and ``start_after``
pairs (an op may not start before another op has started: Liger's event waits, which hold
a secondary kernel until the primary's window opens).

The simulator gives every device two streams, ``compute`` and ``comm``; an op runs on the
stream of its device and kind. A stream runs its ops one at a time in launch order (FIFO,
like a CUDA stream), and an op starts once its stream is free, the op before it in its
vector has ended, its vector is released and its ``start_after`` anchors have started. While
both streams of a device are busy, each op progresses at 1/factor of its solo speed
(:class:`~ligerjax.cost.cost_model.Contention`), so only the overlapped part of an op is
inflated. Tensor-parallel peers run in lock-step, so one device stands for the group.

The :class:`Timeline` holds each op's start and end and the figures a plan is judged by
(primary latency, secondary completion, throughput), and exports a Chrome trace (opens in
Perfetto or chrome://tracing) and a matplotlib PNG.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from tqdm.auto import tqdm

from ligerjax.cost.cost_model import Contention
from ligerjax.schedule.function_vector import (
    COMM,
    COMPUTE,
    PRIMARY,
    SECONDARY,
    FunctionVector,
    Op,
    OpKind,
)

log = logging.getLogger(__name__)

Stream = tuple[int, OpKind]  # (device, kind)
PROGRESS_MIN_OPS = 50_000  # show a progress bar from this many ops on (progress=None)
_TID: Mapping[OpKind, int] = MappingProxyType({COMPUTE: 0, COMM: 1})  # trace thread ids
COLORS: Mapping[str, str] = MappingProxyType({PRIMARY: "#1f77b4", SECONDARY: "#ff7f0e"})


class OpRef(NamedTuple):
    """Op number ``op`` of vector number ``vector`` in a schedule."""

    vector: int
    op: int


@dataclass(frozen=True)
class Schedule:
    """Vectors, their ops' launch order, release times and start-after constraints."""

    vectors: tuple[FunctionVector, ...]
    order: tuple[OpRef, ...]
    release_s: tuple[float, ...] = ()
    start_after: tuple[tuple[OpRef, OpRef], ...] = ()  # (op, anchor): op starts >= anchor

    def __post_init__(self) -> None:
        object.__setattr__(self, "vectors", tuple(self.vectors))
        object.__setattr__(self, "order", tuple(OpRef(*r) for r in self.order))
        release = tuple(float(r) for r in self.release_s) or (0.0,) * len(self.vectors)
        object.__setattr__(self, "release_s", release)
        object.__setattr__(
            self, "start_after", tuple((OpRef(*a), OpRef(*b)) for a, b in self.start_after)
        )
        if len(release) != len(self.vectors):
            raise ValueError(f"release_s: {len(release)} times for {len(self.vectors)} vectors")
        for i, r in enumerate(release):
            if not r >= 0:
                raise ValueError(f"release_s[{i}]={r}: must be >= 0")
        seen: set[OpRef] = set()
        for ref in self.order:
            self._check_ref(ref, "order")
            if ref in seen:
                raise ValueError(f"order: op {ref} appears twice")
            seen.add(ref)
        total = sum(len(v) for v in self.vectors)
        if len(seen) != total:
            missing = next(
                OpRef(v, i)
                for v, vec in enumerate(self.vectors)
                for i in range(len(vec))
                if OpRef(v, i) not in seen
            )
            raise ValueError(f"order: {total - len(seen)} ops never launched (first: {missing})")
        for op_ref, anchor in self.start_after:
            self._check_ref(op_ref, "start_after")
            self._check_ref(anchor, "start_after")

    def _check_ref(self, ref: OpRef, where: str) -> None:
        if not (
            0 <= ref.vector < len(self.vectors) and 0 <= ref.op < len(self.vectors[ref.vector])
        ):
            raise ValueError(f"{where}: op {tuple(ref)} does not exist")

    @classmethod
    def sequential(
        cls, vectors: Sequence[FunctionVector], release_s: Sequence[float] | None = None
    ) -> Schedule:
        """Each vector's ops in order, vector after vector (plain TP serving, FCFS; with
        vectors spread over devices, a pipeline)."""
        vectors = tuple(vectors)
        order = tuple(OpRef(v, i) for v, vec in enumerate(vectors) for i in range(len(vec)))
        return cls(vectors, order, tuple(release_s) if release_s is not None else ())

    def op(self, ref: OpRef) -> Op:
        """The op ``ref`` points at."""
        return self.vectors[ref.vector].ops[ref.op]

    @property
    def num_ops(self) -> int:
        """Ops launched in all."""
        return len(self.order)


@dataclass(frozen=True, slots=True)
class OpRecord:
    """When one op ran."""

    ref: OpRef
    op: Op
    start_s: float
    end_s: float

    @property
    def stream(self) -> Stream:
        """(device, kind) of the stream that ran it."""
        return (self.op.device, self.op.kind)


@dataclass(frozen=True)
class Timeline:
    """Start and end of every op of a simulated :class:`Schedule` (records in launch order)."""

    schedule: Schedule
    records: tuple[OpRecord, ...]
    contention: Contention

    # -- figures -------------------------------------------------------------------------

    @cached_property
    def makespan_s(self) -> float:
        """End of the last op."""
        return max((r.end_s for r in self.records), default=0.0)

    @cached_property
    def completion_s(self) -> tuple[float, ...]:
        """Per vector: when its last op ended (its release time if it has none)."""
        ends = list(self.schedule.release_s)
        for r in self.records:
            ends[r.ref.vector] = max(ends[r.ref.vector], r.end_s)
        return tuple(ends)

    @cached_property
    def latency_s(self) -> tuple[float, ...]:
        """Per vector: completion minus release (queueing included)."""
        return tuple(c - r for c, r in zip(self.completion_s, self.schedule.release_s, strict=True))

    @cached_property
    def primary_latency(self) -> float:
        """From the first primary op's start to the last one's end."""
        prim = [r for r in self.records if r.op.batch == PRIMARY]
        if not prim:
            return 0.0
        return max(r.end_s for r in prim) - min(r.start_s for r in prim)

    @cached_property
    def secondary_completion(self) -> float:
        """When the last secondary op ended (0 without secondary ops)."""
        return max((r.end_s for r in self.records if r.op.batch == SECONDARY), default=0.0)

    @property
    def throughput(self) -> float:
        """Vectors (batches) completed per second of makespan."""
        return len(self.schedule.vectors) / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens of all vectors per second of makespan."""
        tokens = sum(v.tokens for v in self.schedule.vectors)
        return tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    def busy_s(self, device: int, kind: OpKind) -> float:
        """Time the (device, kind) stream was running an op."""
        return math.fsum(r.end_s - r.start_s for r in self.records if r.stream == (device, kind))

    def overlap_s(self, device: int = 0) -> float:
        """Time both streams of ``device`` were busy at once."""
        spans = {
            kind: sorted((r.start_s, r.end_s) for r in self.records if r.stream == (device, kind))
            for kind in (COMPUTE, COMM)
        }
        total, j, comm = 0.0, 0, spans[COMM]
        for a0, a1 in spans[COMPUTE]:
            while j < len(comm) and comm[j][1] <= a0:
                j += 1
            k = j
            while k < len(comm) and comm[k][0] < a1:
                total += max(0.0, min(a1, comm[k][1]) - max(a0, comm[k][0]))
                k += 1
        return total

    def window(self, start_s: float, end_s: float) -> Timeline:
        """The records that overlap ``[start_s, end_s]`` (for export of a slice)."""
        if not end_s > start_s:
            raise ValueError(f"window [{start_s}, {end_s}]: end must be after start")
        kept = tuple(r for r in self.records if r.end_s > start_s and r.start_s < end_s)
        return Timeline(self.schedule, kept, self.contention)

    # -- export --------------------------------------------------------------------------

    def chrome_trace(self) -> dict:
        """The timeline as Chrome trace-event JSON: a process per device, a thread per
        stream (0 compute, 1 comm), one complete ("X") event per op, times in us."""
        events: list[dict] = []
        for device in sorted({r.op.device for r in self.records}):
            events.append(
                {
                    "name": "process_name",
                    "ph": "M",
                    "pid": device,
                    "args": {"name": f"device {device}"},
                }
            )
            for kind, tid in _TID.items():
                events.append(
                    {
                        "name": "thread_name",
                        "ph": "M",
                        "pid": device,
                        "tid": tid,
                        "args": {"name": kind.value},
                    }
                )
        for r in self.records:
            op = r.op
            events.append(
                {
                    "name": op.name,
                    "cat": op.batch,
                    "ph": "X",
                    "ts": r.start_s * 1e6,
                    "dur": (r.end_s - r.start_s) * 1e6,
                    "pid": op.device,
                    "tid": _TID[op.kind],
                    "args": {
                        "vector": self.schedule.vectors[r.ref.vector].name or str(r.ref.vector),
                        "op": r.ref.op,
                        "layer": op.layer,
                        "batch": op.batch,
                        "solo_us": op.duration_s * 1e6,
                        "flops": op.flops,
                        "bytes": op.bytes,
                    },
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def to_chrome_trace(self, path: str | Path) -> Path:
        """Write :meth:`chrome_trace` to ``path`` (open it in ui.perfetto.dev)."""
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path

    def plot(
        self,
        path: str | Path,
        *,
        start_s: float | None = None,
        end_s: float | None = None,
        title: str | None = None,
    ) -> Path:
        """A PNG with one lane per stream, primary and secondary ops in their colours,
        limited to ``[start_s, end_s]`` when given."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        lo = 0.0 if start_s is None else start_s
        hi = self.makespan_s if end_s is None else end_s
        if not hi > lo:
            raise ValueError(f"plot window [{lo}, {hi}]: end must be after start")
        streams = sorted({r.stream for r in self.records}, key=lambda s: (s[0], _TID[s[1]]))
        fig = Figure(figsize=(12, 0.7 * max(2, len(streams)) + 1.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for y, stream in enumerate(streams):
            bars: dict[str, list[tuple[float, float]]] = {PRIMARY: [], SECONDARY: []}
            for r in self.records:
                if r.stream == stream and r.end_s > lo and r.start_s < hi:
                    s, e = max(r.start_s, lo), min(r.end_s, hi)
                    bars[r.op.batch].append((s * 1e3, max((e - s) * 1e3, 1e-9)))
            for role, spans in bars.items():
                if spans:
                    ax.broken_barh(
                        spans,
                        (y - 0.4, 0.8),
                        facecolors=COLORS[role],
                        edgecolor="black",
                        linewidth=0.2,
                    )
        ax.set_yticks(range(len(streams)))
        ax.set_yticklabels([f"dev {d} {k.value}" for d, k in streams])
        ax.set_ylim(-0.6, len(streams) - 0.4)
        ax.set_xlim(lo * 1e3, hi * 1e3)
        ax.invert_yaxis()
        ax.set_xlabel("time (ms)")
        ax.legend(
            handles=[Patch(color=c, label=role) for role, c in COLORS.items()],
            loc="upper right",
            fontsize="small",
        )
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


# -- the simulator ---------------------------------------------------------------------------


def simulate(
    schedule: Schedule,
    contention: Contention | None = None,
    *,
    progress: bool | None = None,
) -> Timeline:
    """Run ``schedule`` on per-device compute and comm streams with ``contention``
    (default :class:`Contention` (), Liger's flat 0.8). ``progress``: a tqdm bar (``None``:
    only for schedules of :data:`PROGRESS_MIN_OPS` ops or more). ``ValueError`` when the
    schedule deadlocks (an op waits on an op queued behind it on a stream)."""
    contention = Contention() if contention is None else contention
    order = schedule.order
    n = len(order)
    pos = {ref: g for g, ref in enumerate(order)}
    ops = [schedule.op(ref) for ref in order]

    stream_ids: dict[Stream, int] = {}
    for op in ops:
        stream_ids.setdefault((op.device, op.kind), len(stream_ids))
    num_streams = len(stream_ids)
    other = [-1] * num_streams
    factor = [1.0] * num_streams
    for (device, kind), sid in stream_ids.items():
        twin_stream = (device, COMM if kind is COMPUTE else COMPUTE)
        other[sid] = stream_ids.get(twin_stream, -1)
        factor[sid] = contention.compute if kind is COMPUTE else contention.comm
    queues: list[list[int]] = [[] for _ in range(num_streams)]
    for g, op in enumerate(ops):
        queues[stream_ids[(op.device, op.kind)]].append(g)

    pred = [pos[OpRef(ref.vector, ref.op - 1)] if ref.op > 0 else -1 for ref in order]
    release = [schedule.release_s[ref.vector] for ref in order]
    anchors: dict[int, list[int]] = {}
    for op_ref, anchor in schedule.start_after:
        anchors.setdefault(pos[op_ref], []).append(pos[anchor])

    started = [False] * n
    done = [False] * n
    remaining = [op.duration_s for op in ops]
    start = [0.0] * n
    end = [0.0] * n
    head = [0] * num_streams
    running = [-1] * num_streams
    finished = 0
    t = 0.0
    bar = tqdm(
        total=n,
        desc="simulate",
        unit="op",
        disable=not (n >= PROGRESS_MIN_OPS if progress is None else progress),
        leave=False,
    )

    def ready(g: int) -> bool:
        p = pred[g]
        if p >= 0 and not done[p]:
            return False
        if release[g] > t:
            return False
        return all(started[a] for a in anchors.get(g, ()))

    while finished < n:
        # Start every head that can start; an op of zero duration ends at once.
        progressed = True
        while progressed:
            progressed = False
            for sid in range(num_streams):
                if running[sid] >= 0 or head[sid] >= len(queues[sid]):
                    continue
                g = queues[sid][head[sid]]
                if not ready(g):
                    continue
                head[sid] += 1
                started[g] = True
                start[g] = t
                progressed = True
                if remaining[g] <= 0.0:
                    end[g] = t
                    done[g] = True
                    finished += 1
                    bar.update(1)
                else:
                    running[sid] = g
        if finished == n:
            break
        active = [sid for sid in range(num_streams) if running[sid] >= 0]
        waiting = [
            release[queues[sid][head[sid]]]
            for sid in range(num_streams)
            if running[sid] < 0
            and head[sid] < len(queues[sid])
            and release[queues[sid][head[sid]]] > t
        ]
        if not active:
            if waiting:
                t = min(waiting)
                continue
            blocked = [
                f"{ops[queues[s][head[s]]].name} ({tuple(order[queues[s][head[s]]])})"
                for s in range(num_streams)
                if head[s] < len(queues[s])
            ]
            raise ValueError(f"schedule deadlocks at t={t:.9g}s: blocked heads {blocked}")
        rate = {}
        for sid in active:
            twin = other[sid]
            rate[sid] = 1.0 / factor[sid] if twin >= 0 and running[twin] >= 0 else 1.0
        finish = {sid: remaining[running[sid]] / rate[sid] for sid in active}
        dt = min(finish.values())
        if waiting:
            dt = min(dt, min(waiting) - t)
        t_next = t + dt
        for sid in active:
            g = running[sid]
            if finish[sid] <= dt * (1 + 1e-12) + 1e-18:
                remaining[g] = 0.0
                end[g] = t_next
                done[g] = True
                running[sid] = -1
                finished += 1
                bar.update(1)
            else:
                remaining[g] -= rate[sid] * dt
        t = t_next
    bar.close()
    records = tuple(OpRecord(order[g], ops[g], start[g], end[g]) for g in range(n))
    log.debug("simulated %d ops on %d streams: makespan %.6gs", n, num_streams, t)
    return Timeline(schedule, records, contention)
