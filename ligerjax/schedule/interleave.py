"""Liger's interleaving planner: fill the primary batch's windows with secondary work.

Walk the primary's function vector segment by segment (a segment is a maximal run of one
kind; its ends are switch points). The primary's ops go first: they are the critical path.
Each segment is a window for the *other* kind of secondary work: a communication window
takes secondary compute, a compute window takes secondary communication. Secondaries are
visited oldest first; the next op of a secondary goes into the window if its duration
inflated by the contention factor fits the room left. One that does not fit is decomposed
vertically when it can be (cut along its rows, never the hidden dimension, into a multiple
of 1/k of it: the largest head that fits goes in, the tail waits for the next window);
otherwise the window closes, as in Liger's prototype (``skip_blocked`` instead moves on to
the next secondary). A secondary whose next op is of the window's own kind is skipped.
Placed secondary ops start no earlier than the window opens (Liger's event wait).

:func:`interleave_greedy` plans one step (one primary, some secondaries), the form the
compiler's interleave pass uses. :func:`plan_liger` runs the same planner over a request
stream as Liger's runtime does: up to ``depth`` requests in flight, the oldest is primary,
and when it finishes the next one becomes primary. Both return plain :class:`Schedule` data
for :func:`~ligerjax.schedule.timeline.simulate`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from ligerjax.cost.cost_model import Contention, CostModel
from ligerjax.schedule.function_vector import (
    COMM,
    COMPUTE,
    PRIMARY,
    SECONDARY,
    BatchRole,
    FunctionVector,
    Op,
    OpKind,
    piece_duration,
    split_op,
)
from ligerjax.schedule.timeline import OpRef, Schedule, simulate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterleaveConfig:
    """Knobs of the planner.

    ``factor``: k, the decomposition granularity (a secondary op is cut at a multiple of
    1/k of its rows; Liger's prototype: 8). ``split_kinds``: which kinds may be cut (the
    prototype cuts GEMMs only). ``slack``: the fraction a window may be overrun (0: the
    primary's critical path is never delayed by planned work). ``skip_blocked``: when a
    secondary's next op cannot fit, try the next secondary instead of closing the window.
    """

    factor: int = 8
    split_kinds: tuple[OpKind, ...] = (COMPUTE,)
    slack: float = 0.0
    skip_blocked: bool = False
    place_oversized: bool = False
    max_delay_s: float = math.inf

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"InterleaveConfig.factor={self.factor}: must be >= 1")
        if not self.slack >= 0:
            raise ValueError(f"InterleaveConfig.slack={self.slack}: must be >= 0")
        if not self.max_delay_s >= 0:
            raise ValueError(f"InterleaveConfig.max_delay_s={self.max_delay_s}: must be >= 0")
        object.__setattr__(self, "split_kinds", tuple(self.split_kinds))
        for kind in self.split_kinds:
            if not isinstance(kind, OpKind):
                raise ValueError(f"InterleaveConfig.split_kinds: {kind!r} is not an OpKind")


@dataclass(frozen=True)
class WindowFill:
    """One primary segment: its kind, solo duration (the budget), the inflated time of the
    secondary ops placed in it and their refs."""

    kind: OpKind
    budget_s: float
    used_s: float
    placed: tuple[OpRef, ...]


@dataclass(frozen=True)
class InterleavePlan:
    """A planned step: the schedule, what each window got, and per secondary the ops no
    window took (empty when they were appended after the primary)."""

    schedule: Schedule
    windows: tuple[WindowFill, ...]
    leftover: tuple[FunctionVector, ...]

    @property
    def coverage(self) -> float:
        """Fraction of the primary's communication time filled with secondary compute."""
        comm = [w for w in self.windows if w.kind is COMM]
        budget = sum(w.budget_s for w in comm)
        return min(1.0, sum(w.used_s for w in comm) / budget) if budget > 0 else 0.0


class _Cursor:
    """A batch being planned: ops still to place, and the ops placed so far."""

    def __init__(self, vector: int, vec: FunctionVector) -> None:
        self.vector = vector
        self.name = vec.name
        self.tokens = vec.tokens
        self.pending: deque[Op] = deque(vec.ops)
        self.placed: list[Op] = []

    def place(self, role: BatchRole) -> OpRef:
        op = self.pending.popleft()
        self.placed.append(op if op.batch == role else op.replace(batch=role))
        return OpRef(self.vector, len(self.placed) - 1)

    def segment(self) -> int:
        """Number of pending ops in the leading same-kind run."""
        kind, n = self.pending[0].kind, 0
        for op in self.pending:
            if op.kind is not kind:
                break
            n += 1
        return n

    def vector_placed(self) -> FunctionVector:
        return FunctionVector(tuple(self.placed), name=self.name, tokens=self.tokens)


class _Planner:
    """Shared state of a plan: the launch order and the start-after pairs."""

    def __init__(
        self, contention: Contention, cost: CostModel | None, config: InterleaveConfig
    ) -> None:
        self.contention = contention
        self.cost = cost
        self.config = config
        self.order: list[OpRef] = []
        self.start_after: list[tuple[OpRef, OpRef]] = []
        self.delay_s = 0.0  # the primary's predicted delay so far

    def run_primary_segment(self, primary: _Cursor) -> tuple[OpKind, float, OpRef]:
        """Place the primary's next segment; return its kind, solo duration, first op."""
        kind = primary.pending[0].kind
        duration, first = 0.0, None
        for _ in range(primary.segment()):
            duration += primary.pending[0].duration_s
            ref = primary.place(PRIMARY)
            first = ref if first is None else first
            self.order.append(ref)
        assert first is not None
        return kind, duration, first

    def fill(
        self, kind: OpKind, budget: float, anchor: OpRef, secondaries: Sequence[_Cursor]
    ) -> WindowFill:
        """Fill a ``kind`` window of solo length ``budget`` with the other kind."""
        f_primary = self.contention.factor(kind.value)
        left = self.config.max_delay_s - self.delay_s
        cap = _most_used(left, budget, f_primary)  # what the delay budget allows
        room = min(budget * (1 + self.config.slack), cap)
        used, placed = 0.0, list[OpRef]()
        for cur in secondaries:
            blocked = False
            while cur.pending and cur.pending[0].kind is not kind:
                op = cur.pending[0]
                f = self.contention.factor(op.kind.value)
                if op.duration_s * f > room - used:
                    rows = self._head_that_fits(op, room - used, f)
                    oversized = (
                        self.config.place_oversized and not placed and op.duration_s * f <= cap
                    )
                    if rows == 0 and not oversized:
                        blocked = True
                        break
                    if rows:
                        head, tail = split_op(op, rows, self.cost)
                        cur.pending[0] = tail
                        cur.pending.appendleft(head)
                        op = head
                ref = cur.place(SECONDARY)
                used += op.duration_s * f
                placed.append(ref)
                self.order.append(ref)
                self.start_after.append((ref, anchor))
            if blocked and not self.config.skip_blocked:
                break
        self.delay_s += used - min(used / f_primary, budget)
        return WindowFill(kind, budget, used, tuple(placed))

    def _head_that_fits(self, op: Op, room: float, f: float) -> int:
        """Rows of the largest multiple-of-1/k head of ``op`` that fits ``room`` (0: none)."""
        k = self.config.factor
        if not op.splittable or op.kind not in self.config.split_kinds or k < 2 or room <= 0:
            return 0
        tried = set()
        for j in range(k - 1, 0, -1):
            rows = round(j * op.rows / k)
            if not 0 < rows < op.rows or rows in tried:
                continue
            tried.add(rows)
            if piece_duration(op, rows, self.cost) * f <= room:
                return rows
        return 0


def _most_used(delay_s: float, budget: float, f: float) -> float:
    """The most secondary time a window of solo length ``budget`` can take while delaying
    the primary (slowed by ``f`` while overlapped) by at most ``delay_s``."""
    if delay_s == math.inf:
        return math.inf
    delay_s = max(delay_s, 0.0)
    if f > 1 and delay_s <= budget * (f - 1):
        return delay_s / (1 - 1 / f)
    return delay_s + budget


def throughput_bound(contention: Contention, max_inflation: float) -> float:
    """The highest steady-state throughput ratio (primary plus the secondary work its
    windows took, back to back, over the interleaved step) that any plan reaches when the
    primary may take ``max_inflation`` longer than alone.

    Secondary compute ``c`` hidden under a primary collective runs ``contention.compute``
    times slower and slows the collective by ``contention.comm``: the primary is delayed
    by ``compute * c * (1 - 1 / comm)``; a secondary collective under primary compute is
    the mirror image. With ``g`` the work hidden per unit of delay (the better of the two)
    and a delay of at most ``max_inflation`` of the primary, the ratio is at most
    ``(1 + g * max_inflation) / (1 + max_inflation)``: ``(1 + 0.05 / 0.25) / 1.05 = 1.143``
    at a 1.25 slowdown both ways and a 5% budget. Infinite when one kind overlaps for free.
    """
    if not max_inflation >= 0:
        raise ValueError(f"max_inflation={max_inflation}: must be >= 0")
    fc, fm = contention.compute, contention.comm
    if fc == 1 or fm == 1:
        return math.inf
    hidden_per_delay = max(1 / (fc * (1 - 1 / fm)), 1 / (fm * (1 - 1 / fc)))
    return max(1.0, (1 + hidden_per_delay * max_inflation) / (1 + max_inflation))


def _resolve_contention(cost: CostModel | None, contention: Contention | None) -> Contention:
    if contention is not None:
        return contention
    return cost.contention if cost is not None else Contention()


def interleave_greedy(
    primary: FunctionVector,
    secondaries: Sequence[FunctionVector] = (),
    *,
    cost: CostModel | None = None,
    contention: Contention | None = None,
    config: InterleaveConfig | None = None,
    append_leftover: bool = True,
) -> InterleavePlan:
    """Plan one step: ``primary``'s ops in order, its windows filled with ``secondaries``'
    work (vector 0 of the schedule is the primary, then the secondaries in order).

    ``cost`` recomputes the durations of decomposed pieces (without it they scale with
    their rows); ``contention`` defaults to ``cost.contention`` (else Liger's flat 0.8).
    Secondary work no window took is appended after the primary when ``append_leftover``,
    else left out of the schedule and returned as ``leftover`` (for the next step)."""
    config = InterleaveConfig() if config is None else config
    planner = _Planner(_resolve_contention(cost, contention), cost, config)
    prim = _Cursor(0, primary.as_batch(PRIMARY))
    secs = [_Cursor(i + 1, vec) for i, vec in enumerate(secondaries)]
    windows = []
    while prim.pending:
        kind, budget, anchor = planner.run_primary_segment(prim)
        windows.append(planner.fill(kind, budget, anchor, secs))
    leftover = tuple(FunctionVector(tuple(c.pending), name=c.name, tokens=c.tokens) for c in secs)
    if append_leftover:
        for cur in secs:
            while cur.pending:
                planner.order.append(cur.place(SECONDARY))
        leftover = tuple(FunctionVector((), name=c.name) for c in secs)
    vectors = (prim.vector_placed(), *(c.vector_placed() for c in secs))
    schedule = Schedule(vectors, tuple(planner.order), (), tuple(planner.start_after))
    return InterleavePlan(schedule, tuple(windows), leftover)


@dataclass(frozen=True)
class SustainedRun:
    """One secondary batch carried to completion over successive steps of one primary.

    ``step_s``: each step's time (the primary, the secondary work its windows took, and any
    op run exposed after it); ``exposed``: secondary ops no window could take even cut,
    each run alone after the primary of the step that found the secondary stuck on it.
    """

    primary_s: float
    secondary_s: float
    step_s: tuple[float, ...]
    exposed: int

    @property
    def steps(self) -> int:
        return len(self.step_s)

    @property
    def ratio(self) -> float:
        """Throughput: the same work back to back (``steps`` primaries and the whole
        secondary) over the interleaved steps' time."""
        return (self.steps * self.primary_s + self.secondary_s) / math.fsum(self.step_s)

    @property
    def mean_inflation(self) -> float:
        """Mean step time over the primary's solo time, minus one (the primary's time per
        token grows by this on average)."""
        return math.fsum(self.step_s) / (self.steps * self.primary_s) - 1

    @property
    def worst_inflation(self) -> float:
        """The longest step over the primary's solo time, minus one."""
        return max(self.step_s) / self.primary_s - 1


def run_to_completion(
    primary: FunctionVector,
    secondary: FunctionVector,
    *,
    cost: CostModel | None = None,
    contention: Contention | None = None,
    config: InterleaveConfig | None = None,
    max_steps: int = 100_000,
) -> SustainedRun:
    """Plan step after step of ``primary`` (:func:`interleave_greedy`, the secondary's
    leftover carried over) until ``secondary`` is done: the sustained throughput, where one
    step's figure counts only the work its windows took. A step that can place nothing
    runs the secondary's next op exposed after its primary, as Liger's runtime would
    rather than stall the batch (e.g. a prefill's all-reduce longer than any primary
    compute window)."""
    contention = _resolve_contention(cost, contention)
    left, steps, exposed = secondary, list[float](), 0
    while len(left):
        if len(steps) == max_steps:
            raise ValueError(f"max_steps={max_steps}: {secondary.name} not done")
        plan = interleave_greedy(
            primary, [left], cost=cost, contention=contention, config=config, append_leftover=False
        )
        step = simulate(plan.schedule, contention).makespan_s
        left = plan.leftover[0]
        if not len(plan.schedule.vectors[1]):
            step += left.ops[0].duration_s
            left = FunctionVector(left.ops[1:], name=left.name, tokens=left.tokens)
            exposed += 1
        steps.append(step)
    return SustainedRun(primary.duration_s, secondary.duration_s, tuple(steps), exposed)


@dataclass(frozen=True)
class LigerConfig:
    """Liger's runtime: up to ``depth`` requests in flight (the prototype: 6), one primary."""

    depth: int = 6
    interleave: InterleaveConfig = InterleaveConfig()

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"LigerConfig.depth={self.depth}: must be >= 1")


def plan_liger(
    vectors: Sequence[FunctionVector],
    release_s: Sequence[float] | None = None,
    *,
    cost: CostModel | None = None,
    contention: Contention | None = None,
    config: LigerConfig | None = None,
    progress: bool | None = None,
    on_admit: Callable[[int, float], None] | None = None,
) -> Schedule:
    """Plan a request stream the way Liger's runtime serves it.

    ``vectors[i]`` is request i's function vector, arriving at ``release_s[i]`` (sorted;
    default all at 0). The planner keeps a predicted clock: a request joins the in-flight
    set once the clock passes its arrival and there is room; the oldest in flight is the
    primary, whose segments advance the clock (stretched by contention where they were
    filled); the others fill its windows. ``on_admit(i, t)`` is told when request i joins.
    """
    config = LigerConfig() if config is None else config
    contention = _resolve_contention(cost, contention)
    vectors = tuple(vectors)
    release = (0.0,) * len(vectors) if release_s is None else tuple(map(float, release_s))
    if len(release) != len(vectors):
        raise ValueError(f"release_s: {len(release)} times for {len(vectors)} vectors")
    if any(b < a for a, b in itertools.pairwise(release)):
        raise ValueError("release_s: arrivals must be sorted")
    planner = _Planner(contention, cost, config.interleave)
    cursors = [_Cursor(i, vec) for i, vec in enumerate(vectors)]
    inflight: deque[_Cursor] = deque()
    nxt, clock = 0, 0.0
    show = len(vectors) * max((len(v) for v in vectors), default=0) >= 50_000
    bar = tqdm(
        total=len(vectors),
        desc="plan liger",
        unit="req",
        leave=False,
        disable=not (show if progress is None else progress),
    )
    while nxt < len(vectors) or inflight:
        if not inflight and nxt < len(vectors):
            clock = max(clock, release[nxt])
        while nxt < len(vectors) and len(inflight) < config.depth and release[nxt] <= clock:
            if on_admit is not None:
                on_admit(nxt, clock)
            inflight.append(cursors[nxt])
            nxt += 1
        primary = inflight[0]
        if not primary.pending:  # an empty vector
            inflight.popleft()
            bar.update(1)
            continue
        kind, budget, anchor = planner.run_primary_segment(primary)
        window = planner.fill(kind, budget, anchor, list(inflight)[1:])
        f = contention.factor(kind.value)
        # While filled, the primary's segment advances at 1/f: used_s of wall time covers
        # used_s/f of it, the rest runs solo.
        clock += budget + window.used_s - min(window.used_s / f, budget)
        if not primary.pending:
            inflight.popleft()
            bar.update(1)
    bar.close()
    placed = tuple(c.vector_placed() for c in cursors)
    return Schedule(placed, tuple(planner.order), release, tuple(planner.start_after))
