"""GLM-130B-sized function vectors and Liger's request stream."""

from __future__ import annotations

import pytest

from ligerjax.cost import CostModel
from ligerjax.schedule import COMM, COMPUTE
from ligerjax.schedule.liger_workloads import (
    GLM_130B,
    arrival_times,
    layer_ops,
    liger_requests,
    pp_vector,
    stage_layers,
    tp_vector,
)

COST = CostModel.for_device("a100-pcie")


def test_tp_layer_has_megatron_ops_and_two_all_reduces():
    ops = layer_ops(GLM_130B, COST, batch=2, seq_len=64, tp=4)
    assert [op.name for op in ops] == [
        "ln_attn",
        "qkv",
        "attention",
        "out_proj",
        "all_reduce",
        "ln_mlp",
        "mlp_up",
        "gelu",
        "mlp_down",
        "all_reduce",
    ]
    m, e = 128, 12288
    qkv = ops[1]
    assert qkv.flops == 2 * m * e * 3 * e // 4
    assert qkv.fixed_bytes == e * 3 * e // 4 * 2  # fp16 weights, read by every piece
    assert qkv.duration_s == COST.op_duration(qkv.flops, qkv.bytes, "float16")
    ar = ops[4]
    assert (ar.kind, ar.bytes, ar.group) == (COMM, m * e * 2, 4)
    assert ar.duration_s == COST.all_reduce(m * e * 2, 4)
    assert GLM_130B.layer_params == 12 * e * e  # same as GLM-130B's GeGLU 32768 MLP


def test_tp_vector_repeats_layers_with_two_switch_points_each():
    v = tp_vector(GLM_130B, COST, batch=2, seq_len=32, tp=4, num_layers=3)
    assert len(v) == 30 and v.switch_points() == (4, 9, 14, 19, 24, 29)
    assert v.tokens == 64 and {op.layer for op in v} == {0, 1, 2}
    assert all(op.kind is COMPUTE for op in layer_ops(GLM_130B, COST, batch=1, seq_len=8))


def test_pp_vector_spreads_stages_over_devices_with_sends_between():
    v = pp_vector(GLM_130B, COST, batch=2, seq_len=32, pp=4, num_layers=6)
    sends = [op for op in v if op.kind is COMM]
    assert [op.device for op in sends] == [0, 1, 2]
    assert {op.device for op in v} == {0, 1, 2, 3}
    assert stage_layers(70, 4) == (18, 18, 17, 17)
    assert stage_layers(6, 4) == (2, 2, 1, 1)


def test_request_stream_follows_the_artifact():
    reqs = liger_requests(500, seed=1)
    assert all(b == 2 and 16 <= s <= 115 for b, s in reqs)
    assert arrival_times(3, 4.0) == (0.0, 0.25, 0.5)
    poisson = arrival_times(100, 10.0, pattern="poisson", seed=0)
    assert poisson[0] == 0.0 and list(poisson) == sorted(poisson)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: layer_ops(GLM_130B, COST, batch=2, seq_len=8, tp=5), "tp=5"),
        (lambda: layer_ops(GLM_130B, COST, batch=0, seq_len=8), "batch=0"),
        (lambda: tp_vector(GLM_130B, COST, batch=1, seq_len=8, tp=4, num_layers=0), "num_layers=0"),
        (lambda: stage_layers(3, 4), "pp=4"),
        (lambda: arrival_times(3, -1.0), "rate=-1.0"),
        (lambda: arrival_times(3, 1.0, pattern="bursty"), "pattern='bursty'"),
        (lambda: liger_requests(0), "n=0"),
    ],
)
def test_bad_workload_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
