"""Function vectors, the interleaving planner and the timeline simulator."""

from __future__ import annotations

from ligerjax.schedule.function_vector import (
    COMM,
    COMPUTE,
    PRIMARY,
    SECONDARY,
    FunctionVector,
    Op,
    OpKind,
    Segment,
    decompose,
    split_op,
)
from ligerjax.schedule.interleave import (
    InterleaveConfig,
    InterleavePlan,
    LigerConfig,
    SustainedRun,
    WindowFill,
    interleave_greedy,
    plan_liger,
    run_to_completion,
    throughput_bound,
)
from ligerjax.schedule.timeline import OpRecord, OpRef, Schedule, Timeline, simulate

__all__ = [
    "COMM",
    "COMPUTE",
    "PRIMARY",
    "SECONDARY",
    "FunctionVector",
    "InterleaveConfig",
    "InterleavePlan",
    "LigerConfig",
    "Op",
    "OpKind",
    "OpRecord",
    "OpRef",
    "Schedule",
    "Segment",
    "SustainedRun",
    "Timeline",
    "WindowFill",
    "decompose",
    "interleave_greedy",
    "plan_liger",
    "run_to_completion",
    "simulate",
    "split_op",
    "throughput_bound",
]
