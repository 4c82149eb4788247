"""Function vectors: switch points, segments, vertical decomposition."""

from __future__ import annotations

import pytest

from ligerjax.cost import Contention, CostModel, DeviceSpec
from ligerjax.schedule import COMM, COMPUTE, FunctionVector, Op, decompose, split_op

TOY = DeviceSpec(
    name="toy",
    vendor="nvidia",
    peak_flops=(("float16", 100.0),),
    memory_bandwidth=10.0,
    link_bandwidth=8.0,
    link_latency=0.25,
    launch_latency=1.0,
    memory_bytes=1e9,
    compute_efficiency=0.5,
    memory_efficiency=0.5,
    link_efficiency=0.5,
)


def vec(*kinds: str) -> FunctionVector:
    ops = [Op(f"op{i}", COMPUTE if k == "c" else COMM, duration_s=1.0) for i, k in enumerate(kinds)]
    return FunctionVector(tuple(ops), name="v")


def test_switch_points_are_where_compute_turns_to_communication():
    assert vec("c", "c", "m", "c", "m", "m", "c").switch_points() == (2, 4)
    assert vec("m", "c").switch_points() == ()
    assert vec().switch_points() == ()


def test_segments_are_maximal_same_kind_runs():
    segs = vec("c", "c", "m", "c", "m", "m").segments()
    assert [(s.kind, s.start, s.stop, s.duration_s) for s in segs] == [
        (COMPUTE, 0, 2, 2.0),
        (COMM, 2, 3, 1.0),
        (COMPUTE, 3, 4, 1.0),
        (COMM, 4, 6, 2.0),
    ]
    v = vec("c", "m", "c")
    assert (v.duration_s, v.compute_s, v.comm_s) == (3.0, 2.0, 1.0)
    assert all(op.batch == "secondary" for op in v.as_batch("secondary"))


def test_split_keeps_fixed_bytes_in_every_piece_and_recomputes_the_roofline():
    cost = CostModel(TOY, Contention.none())
    # 8 rows; 100 bytes of weights read by any piece, 80 bytes of activations shared out
    op = Op(
        "gemm",
        COMPUTE,
        duration_s=cost.op_duration(800, 180),
        flops=800,
        bytes=180,
        rows=8,
        fixed_bytes=100,
    )
    head, tail = split_op(op, 2, cost)
    assert (head.rows, tail.rows) == (2, 6)
    assert (head.flops, tail.flops) == (200, 600)
    assert (head.bytes, tail.bytes) == (120, 160)
    assert head.duration_s == cost.op_duration(200, 120)  # 1 + max(4, 24) = 25
    assert head.name == "gemm[0:2]" and tail.name == "gemm[2:8]"
    a, b = split_op(tail, 3, cost)
    assert (a.name, b.name) == ("gemm[2:5]", "gemm[5:8]")
    assert head.duration_s + tail.duration_s > op.duration_s  # pieces re-read the weights


def test_split_without_roofline_data_scales_the_duration():
    op = Op("x", COMPUTE, duration_s=2.0, rows=8)
    head, tail = split_op(op, 3)
    assert (head.duration_s, tail.duration_s) == (0.75, 1.25)
    pieces = decompose(op, 4)
    assert [p.rows for p in pieces] == [2, 2, 2, 2]
    assert sum(p.duration_s for p in pieces) == pytest.approx(2.0)
    assert decompose(op, 1) == (op,)


def test_op_takes_the_briefs_positional_order():
    op = Op("qkv", COMPUTE, 10.0, 20.0, 0.5, "secondary", 3)
    assert (op.flops, op.bytes, op.duration_s, op.batch, op.layer) == (10, 20, 0.5, "secondary", 3)


def test_bad_ops_and_splits_raise_value_error_naming_the_value():
    with pytest.raises(ValueError, match="bytes=-1"):
        Op("x", COMPUTE, duration_s=1.0, bytes=-1)
    with pytest.raises(ValueError, match=r"duration_s=-0\.5"):
        Op("x", COMPUTE, duration_s=-0.5)
    with pytest.raises(ValueError, match="batch='tertiary'"):
        Op("x", COMPUTE, duration_s=1.0, batch="tertiary")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="collective='gossip'"):
        Op("x", COMM, duration_s=1.0, collective="gossip")
    with pytest.raises(ValueError, match="rows=8"):
        split_op(Op("x", COMPUTE, duration_s=1.0, rows=8), 8)
    with pytest.raises(ValueError, match="rows=0"):
        split_op(Op("x", COMPUTE, duration_s=1.0), 1)
    with pytest.raises(ValueError, match="k=9"):
        decompose(Op("x", COMPUTE, duration_s=1.0, rows=8), 9)
