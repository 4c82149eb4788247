"""The timeline simulator on hand-made vectors with exactly known timelines."""

from __future__ import annotations

import json

import pytest

from ligerjax.cost import Contention
from ligerjax.schedule import (
    COMM,
    COMPUTE,
    FunctionVector,
    Op,
    OpRef,
    Schedule,
    interleave_greedy,
    simulate,
)

LIGER = Contention(compute=1.25, comm=1.0)


def primary() -> FunctionVector:
    """Compute 1 s, one 1 s communication window, compute 1 s."""
    return FunctionVector(
        (
            Op("c1", COMPUTE, duration_s=1.0),
            Op("m1", COMM, duration_s=1.0),
            Op("c2", COMPUTE, duration_s=1.0),
        ),
        name="p",
    )


def spans(timeline):
    return {r.op.name: (r.start_s, r.end_s) for r in timeline.records}


def test_sequential_vectors_run_back_to_back():
    tl = simulate(Schedule.sequential([primary(), primary()]), LIGER)
    assert [(r.start_s, r.end_s) for r in tl.records] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (4, 5),
        (5, 6),
    ]
    assert tl.makespan_s == 6 and tl.completion_s == (3, 6) and tl.throughput == 2 / 6


def test_secondary_that_fits_completes_inside_the_window_and_the_primary_keeps_its_latency():
    sec = FunctionVector((Op("s1", COMPUTE, duration_s=0.5),), name="s")
    tl = simulate(interleave_greedy(primary(), [sec], contention=LIGER).schedule, LIGER)
    s = spans(tl)
    assert s["s1"] == (1.0, pytest.approx(1.625))  # 0.5 s at 1/1.25 speed, inside m1
    assert s["c2"] == (2.0, 3.0)
    assert tl.primary_latency == 3.0
    assert tl.secondary_completion == pytest.approx(1.625)


def test_secondary_that_does_not_fit_is_decomposed_and_the_rest_runs_after():
    sec = FunctionVector((Op("s1", COMPUTE, duration_s=2.0, rows=8),), name="s")
    plan = interleave_greedy(primary(), [sec], contention=LIGER)
    tl = simulate(plan.schedule, LIGER)
    s = spans(tl)
    # 3/8 of it (0.75 s solo, 0.9375 s inflated) is the largest piece that fits 1 s
    assert s["s1[0:3]"] == (1.0, pytest.approx(1.9375))
    assert s["c2"] == (2.0, 3.0)
    assert s["s1[3:8]"] == (3.0, pytest.approx(4.25))
    assert tl.primary_latency == 3.0
    assert tl.secondary_completion == pytest.approx(4.25)
    assert plan.coverage == pytest.approx(0.9375)


def test_an_unsplittable_secondary_that_does_not_fit_waits_for_the_primary():
    sec = FunctionVector((Op("s1", COMPUTE, duration_s=2.0),), name="s")
    tl = simulate(interleave_greedy(primary(), [sec], contention=LIGER).schedule, LIGER)
    assert spans(tl)["s1"] == (3.0, 5.0)
    assert tl.primary_latency == 3.0


def test_secondary_communication_fills_a_primary_compute_window():
    prim = FunctionVector(
        (Op("c1", COMPUTE, duration_s=2.0), Op("m1", COMM, duration_s=1.0)), name="p"
    )
    sec = FunctionVector(
        (Op("sm", COMM, duration_s=1.0), Op("sc", COMPUTE, duration_s=0.5)), name="s"
    )
    tl = simulate(interleave_greedy(prim, [sec], contention=LIGER).schedule, LIGER)
    s = spans(tl)
    assert s["sm"] == (0.0, 1.0)  # comm is not slowed (LIGER.comm = 1)
    assert s["c1"] == (0.0, pytest.approx(2.2))  # 1 s overlapped at 1/1.25, then 1 s solo
    assert s["sc"][0] == pytest.approx(2.2)  # fills m1's window
    assert s["m1"] == (pytest.approx(2.2), pytest.approx(3.2))


def test_contention_inflates_only_the_overlapped_part():
    a = FunctionVector((Op("a", COMPUTE, duration_s=1.0),), name="a")
    b = FunctionVector((Op("b", COMM, duration_s=0.5),), name="b")
    tl = simulate(Schedule.sequential([a, b]), Contention(compute=2.0, comm=2.0))
    s = spans(tl)
    assert s["b"] == (0.0, 1.0)  # 0.5 s of work at half speed
    assert s["a"] == (0.0, 1.5)  # 0.5 s done by t=1, the rest solo
    assert tl.overlap_s() == 1.0
    assert tl.busy_s(0, COMPUTE) == 1.5


def test_release_times_and_start_after_hold_ops_back():
    a = FunctionVector((Op("a", COMPUTE, duration_s=1.0),), name="a")
    b = FunctionVector((Op("b", COMM, duration_s=1.0),), name="b")
    tl = simulate(Schedule.sequential([a, b], release_s=[0.0, 2.5]), LIGER)
    assert spans(tl)["b"] == (2.5, 3.5)
    assert tl.latency_s == (1.0, 1.0)
    sched = Schedule((a, b), ((0, 0), (1, 0)), (), (((1, 0), (0, 0)),))
    assert spans(simulate(sched, LIGER))["b"] == (0.0, 1.0)
    # b may not start before a starts; a is released at 1
    sched = Schedule((a, b), ((0, 0), (1, 0)), (1.0, 0.0), (((1, 0), (0, 0)),))
    assert spans(simulate(sched, Contention.none()))["b"] == (1.0, 2.0)


def test_pipeline_stages_overlap_across_devices():
    def request(name):
        return FunctionVector(
            (
                Op("s0", COMPUTE, duration_s=1.0, device=0),
                Op("send", COMM, duration_s=0.5, device=0),
                Op("s1", COMPUTE, duration_s=1.0, device=1),
            ),
            name=name,
        )

    tl = simulate(Schedule.sequential([request("r0"), request("r1")]), Contention.none())
    ends = tl.completion_s
    assert ends == (2.5, 3.5)  # r1's stage 0 runs while r0 is in stage 1


def test_deadlocks_and_bad_schedules_raise_value_error():
    v = FunctionVector(
        (Op("a", COMPUTE, duration_s=1.0), Op("b", COMPUTE, duration_s=1.0)), name="v"
    )
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(Schedule((v,), ((0, 1), (0, 0))), LIGER)
    with pytest.raises(ValueError, match="appears twice"):
        Schedule((v,), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="never launched"):
        Schedule((v,), ((0, 0),))
    with pytest.raises(ValueError, match=r"op \(0, 5\) does not exist"):
        Schedule((v,), ((0, 0), (0, 5)))
    with pytest.raises(ValueError, match=r"release_s\[0\]=-1.0"):
        Schedule.sequential([v], release_s=[-1.0])


def test_chrome_trace_is_trace_event_json(tmp_path):
    sec = FunctionVector((Op("s1", COMPUTE, duration_s=0.5),), name="s")
    tl = simulate(interleave_greedy(primary(), [sec], contention=LIGER).schedule, LIGER)
    path = tl.to_chrome_trace(tmp_path / "t.json")
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 4
    for e in complete:
        assert {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"} <= e.keys()
        assert e["tid"] in (0, 1) and e["dur"] >= 0
    s1 = next(e for e in complete if e["name"] == "s1")
    assert (s1["cat"], s1["ts"], s1["tid"]) == ("secondary", 1e6, 0)
    names = {(e["tid"], e["args"]["name"]) for e in events if e["name"] == "thread_name"}
    assert names == {(0, "compute"), (1, "comm")}


def test_plot_writes_a_png(tmp_path):
    tl = simulate(interleave_greedy(primary(), [primary()], contention=LIGER).schedule, LIGER)
    path = tl.plot(tmp_path / "t.png", title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    window = tl.window(1.0, 2.0)
    assert all(r.end_s > 1.0 and r.start_s < 2.0 for r in window.records)
    assert window.plot(tmp_path / "w.png", start_s=1.0, end_s=2.0).exists()
    with pytest.raises(ValueError, match="end must be after start"):
        tl.plot(tmp_path / "x.png", start_s=2.0, end_s=1.0)


def test_op_ref_is_a_plain_pair():
    assert OpRef(1, 2) == (1, 2)
