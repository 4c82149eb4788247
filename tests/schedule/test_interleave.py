"""The greedy interleaving planner and the Liger request-stream planner."""

from __future__ import annotations

import math

import pytest

from ligerjax.cost import Contention, CostModel
from ligerjax.schedule import (
    COMM,
    COMPUTE,
    FunctionVector,
    InterleaveConfig,
    LigerConfig,
    Op,
    Schedule,
    SustainedRun,
    interleave_greedy,
    plan_liger,
    run_to_completion,
    simulate,
    throughput_bound,
)
from ligerjax.schedule.liger_workloads import GLM_130B, tp_vector

LIGER = Contention(compute=1.25, comm=1.0)


def layer(name: str, c: float = 1.0, m: float = 1.0, rows: int = 8) -> FunctionVector:
    return FunctionVector(
        (
            Op("c1", COMPUTE, duration_s=c, rows=rows),
            Op("m1", COMM, duration_s=m),
            Op("c2", COMPUTE, duration_s=c, rows=rows),
            Op("m2", COMM, duration_s=m),
        ),
        name=name,
    )


def test_leftover_is_returned_for_the_next_step_when_not_appended():
    sec = FunctionVector((Op("s1", COMPUTE, duration_s=2.0, rows=8),), name="s")
    prim = FunctionVector(
        (Op("c", COMPUTE, duration_s=1.0), Op("m", COMM, duration_s=1.0)), name="p"
    )
    plan = interleave_greedy(prim, [sec], contention=LIGER, append_leftover=False)
    assert [op.name for op in plan.schedule.vectors[1]] == ["s1[0:3]"]
    assert [op.name for op in plan.leftover[0]] == ["s1[3:8]"]
    assert [(w.kind, w.budget_s) for w in plan.windows] == [(COMPUTE, 1.0), (COMM, 1.0)]
    assert plan.windows[1].used_s == pytest.approx(0.9375)


def test_a_blocked_secondary_closes_the_window_unless_skip_blocked():
    big = FunctionVector((Op("big", COMPUTE, duration_s=5.0),), name="big")
    small = FunctionVector((Op("small", COMPUTE, duration_s=0.4),), name="small")
    prim = FunctionVector(
        (Op("c", COMPUTE, duration_s=1.0), Op("m", COMM, duration_s=1.0)), name="p"
    )
    closed = interleave_greedy(prim, [big, small], contention=LIGER)
    assert closed.windows[1].placed == ()
    skipping = interleave_greedy(
        prim, [big, small], contention=LIGER, config=InterleaveConfig(skip_blocked=True)
    )
    assert [closed.schedule.op(r).name for r in skipping.windows[1].placed] == ["small"]


def test_slack_lets_fills_overrun_the_window():
    sec = FunctionVector((Op("s", COMPUTE, duration_s=0.84),), name="s")  # 1.05 s inflated
    prim = FunctionVector((Op("m", COMM, duration_s=1.0),), name="p")
    assert interleave_greedy(prim, [sec], contention=LIGER).windows[0].placed == ()
    slack = InterleaveConfig(slack=0.05)
    assert len(interleave_greedy(prim, [sec], contention=LIGER, config=slack).windows[0].placed)


def test_plan_liger_with_depth_one_is_plain_sequential_serving():
    reqs = [layer(f"r{i}") for i in range(3)]
    seq = simulate(Schedule.sequential(reqs), LIGER)
    one = simulate(plan_liger(reqs, contention=LIGER, config=LigerConfig(depth=1)), LIGER)
    assert one.completion_s == seq.completion_s


def test_plan_liger_overlaps_requests_and_beats_sequential_serving():
    reqs = [layer(f"r{i}", c=1.0, m=1.0) for i in range(4)]
    seq = simulate(Schedule.sequential(reqs), Contention.none())
    tl = simulate(plan_liger(reqs, contention=Contention.none()), Contention.none())
    assert tl.makespan_s < seq.makespan_s
    assert tl.completion_s[0] == seq.completion_s[0]  # the first primary is never delayed
    placed = sum(len(v) for v in tl.schedule.vectors)
    assert placed >= sum(len(r) for r in reqs)  # every op placed (some cut into pieces)


def test_plan_liger_respects_arrivals_and_rejects_unsorted_ones():
    reqs = [layer("a"), layer("b")]
    tl = simulate(plan_liger(reqs, [0.0, 10.0], contention=LIGER), LIGER)
    assert min(r.start_s for r in tl.records if r.ref.vector == 1) >= 10.0
    with pytest.raises(ValueError, match="sorted"):
        plan_liger(reqs, [1.0, 0.0])
    with pytest.raises(ValueError, match="depth=0"):
        LigerConfig(depth=0)
    with pytest.raises(ValueError, match="factor=0"):
        InterleaveConfig(factor=0)


def test_interleaving_real_layers_keeps_the_primary_within_contention_of_alone():
    cost = CostModel.for_device("a100-pcie")
    prim = tp_vector(GLM_130B, cost, batch=2, seq_len=100, tp=4, num_layers=2)
    secs = [tp_vector(GLM_130B, cost, batch=2, seq_len=64, tp=4, num_layers=2)]
    plan = interleave_greedy(prim, secs, cost=cost)
    tl = simulate(plan.schedule, cost.contention)
    alone = prim.duration_s
    assert alone <= tl.primary_latency <= alone * cost.contention.comm + 1e-12
    assert 0 < plan.coverage <= 1


def test_the_delay_budget_limits_what_windows_take():
    """Comm windows of 1.0 s, primary comm slowed 1.25x when overlapped: a window holding
    u seconds of secondary work delays the primary by u - min(u / 1.25, 1.0) = u / 5."""
    prim = FunctionVector(
        (
            Op("c", COMPUTE, duration_s=1.0),
            Op("m1", COMM, duration_s=1.0),
            Op("c2", COMPUTE, duration_s=1.0),
            Op("m2", COMM, duration_s=1.0),
        ),
        name="p",
    )
    sec = FunctionVector(tuple(Op(f"s{i}", COMPUTE, duration_s=0.1) for i in range(30)), name="s")
    both = Contention(compute=1.0, comm=1.25)
    config = InterleaveConfig(max_delay_s=0.3)
    plan = interleave_greedy(prim, [sec], contention=both, config=config, append_leftover=False)
    used = [w.used_s for w in plan.windows if w.kind is COMM]
    # Window 1 takes 1.0 s (delay 0.2 s), window 2 only what 0.1 s of delay allows: 0.5 s.
    assert used == pytest.approx([1.0, 0.5])
    unlimited = interleave_greedy(prim, [sec], contention=both, append_leftover=False)
    assert [w.used_s for w in unlimited.windows if w.kind is COMM] == pytest.approx([1.0, 1.0])


def test_an_oversized_op_takes_an_empty_window_only_within_the_delay_budget():
    prim = FunctionVector(
        (Op("c", COMPUTE, duration_s=1.0), Op("m", COMM, duration_s=1.0)), name="p"
    )
    big = FunctionVector((Op("big", COMPUTE, duration_s=1.5),), name="big")
    none = Contention.none()
    placed = interleave_greedy(
        prim, [big], contention=none, config=InterleaveConfig(place_oversized=True)
    )
    assert len(placed.windows[1].placed) == 1
    over_budget = interleave_greedy(
        prim,
        [big],
        contention=none,
        config=InterleaveConfig(place_oversized=True, max_delay_s=0.4),
    )
    assert over_budget.windows[1].placed == ()


@pytest.mark.parametrize(
    ("compute", "comm", "bound"),
    [(1.25, 1.25, 1.2 / 1.05), (1.15, 1.15, (1 + 0.05 / 0.15) / 1.05), (2.0, 2.0, 1.0)],
)
def test_throughput_bound_at_a_symmetric_slowdown(compute, comm, bound):
    assert throughput_bound(Contention(compute, comm), 0.05) == pytest.approx(bound)


def test_throughput_bound_is_infinite_when_one_kind_overlaps_for_free():
    assert throughput_bound(Contention(compute=1.25, comm=1.0), 0.05) == math.inf
    with pytest.raises(ValueError, match=r"max_inflation=-0\.1"):
        throughput_bound(Contention(), -0.1)


@pytest.mark.parametrize(
    ("contention", "close"),
    [
        (Contention(1.25, 1.25), True),
        (Contention(1.15, 1.15), True),
        (Contention(1.4, 1.1), True),
        # The bound's better route here hides secondary collectives; this secondary has none.
        (Contention(1.1, 1.4), False),
    ],
)
def test_no_plan_beats_the_throughput_bound_and_a_long_secondary_comes_close(contention, close):
    from ligerjax.bench.interleave import steady_state

    cost = CostModel.for_device("a100-pcie", contention)
    primary = FunctionVector(tuple(op for i in range(8) for op in layer(f"p{i}").ops), name="p")
    secondary = FunctionVector(
        tuple(Op(f"s{i}", COMPUTE, duration_s=0.5, rows=64) for i in range(400)), name="s"
    )
    step, back_to_back, inflation = steady_state(primary, secondary, cost, 0.05)
    bound = throughput_bound(contention, 0.05)
    assert inflation <= 0.05 + 1e-9
    assert back_to_back / step <= bound + 1e-9
    if close:
        assert back_to_back / step >= 1 + 0.9 * (bound - 1)


def test_a_sustained_run_counts_every_step_and_the_whole_secondary():
    run = SustainedRun(primary_s=1.0, secondary_s=2.0, step_s=(1.5, 1.5, 1.1), exposed=0)
    assert run.steps == 3
    assert run.ratio == pytest.approx((3 * 1.0 + 2.0) / 4.1)
    assert run.mean_inflation == pytest.approx(4.1 / 3 - 1)
    assert run.worst_inflation == pytest.approx(0.5)


def _budgeted(primary: FunctionVector) -> InterleaveConfig:
    from passes.interleave import planner_config

    return planner_config(primary, max_inflation=0.05)


def test_a_splittable_secondary_runs_to_completion_within_the_budget():
    primary = FunctionVector(tuple(op for i in range(4) for op in layer(f"p{i}").ops), name="p")
    secondary = FunctionVector(
        tuple(Op(f"s{i}", COMPUTE, duration_s=0.6, rows=64) for i in range(20)), name="s"
    )
    run = run_to_completion(primary, secondary, contention=LIGER, config=_budgeted(primary))
    assert run.exposed == 0 and run.steps > 1
    assert run.secondary_s == pytest.approx(12.0)
    assert run.worst_inflation <= 0.05 + 1e-9
    assert 1.0 < run.ratio <= throughput_bound(LIGER, 0.05)


def test_a_collective_no_window_can_take_runs_exposed_after_the_primary():
    primary = FunctionVector(tuple(op for i in range(4) for op in layer(f"p{i}").ops), name="p")
    secondary = FunctionVector(
        (
            Op("s0", COMPUTE, duration_s=0.5, rows=64),
            Op("s1", COMM, duration_s=5.0),  # five times the longest primary compute window
            Op("s2", COMPUTE, duration_s=0.5, rows=64),
        ),
        name="s",
    )
    run = run_to_completion(primary, secondary, contention=LIGER, config=_budgeted(primary))
    assert run.exposed == 1
    assert run.worst_inflation >= 5.0 / primary.duration_s
    assert run.ratio < 1 + 1.0 / primary.duration_s  # only the compute was hidden


def test_run_to_completion_stops_at_max_steps():
    primary = FunctionVector((Op("c", COMPUTE, duration_s=1.0), Op("m", COMM, duration_s=1.0)))
    secondary = FunctionVector(
        tuple(Op(f"s{i}", COMPUTE, duration_s=0.5, rows=8) for i in range(50)), name="s"
    )
    with pytest.raises(ValueError, match="max_steps=3: s not done"):
        run_to_completion(primary, secondary, contention=LIGER, max_steps=3)
