"""The interleaved step of a 7B-like Llama compiled for 4×H100 and 4×A100 without a GPU.

A decode-sized primary (32 tokens) and a prefill-sized secondary (1024 tokens) share the
weights of a 2-layer Llama with hidden 4096 and 32 heads (bf16, abstract: nothing is
allocated). In XLA's scheduled HLO every primary all-reduce must be asynchronous with
secondary compute inside its window, and the overlap coverage (cost-model durations) at
least 0.8; the same step without the emit pass's barriers shows what they buy.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ligerjax import ligerize
from ligerjax.cost import Contention
from ligerjax.schedule import throughput_bound
from models import Llama, LlamaConfig

pytestmark = [pytest.mark.deviceless, pytest.mark.slow]

LLAMA_7B_LIKE = LlamaConfig.preset("llama2-7b", num_layers=2)
PRIMARY = (jax.ShapeDtypeStruct((1, 32), jnp.int32),)
SECONDARY = (jax.ShapeDtypeStruct((1, 1024), jnp.int32),)


@pytest.fixture(scope="module")
def plans():
    model = nnx.eval_shape(lambda: Llama(LLAMA_7B_LIKE, rngs=nnx.Rngs(0)))
    lm = ligerize(model)
    cache = {}

    def plan(target: str, barriers: bool = True):
        if (target, barriers) not in cache:
            cache[target, barriers] = lm.plan(
                PRIMARY, SECONDARY, target=target, num_devices=4, barriers=barriers
            )
        return cache[target, barriers]

    return plan


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_every_primary_all_reduce_encloses_secondary_compute(plans, target):
    schedule = plans(target)
    primary = [r for r in schedule.coverage.records if r.selected]
    assert len(primary) == 2 * LLAMA_7B_LIKE.num_layers  # two all-reduces per layer
    for record in primary:
        assert record.kind == "all_reduce"
        assert record.is_async, record
        assert record.compute_inside_s > 0 and record.compute_names, record
    assert schedule.overlap_coverage >= 0.8
    assert schedule.primary_latency_inflation <= 0.05 + 1e-9


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_without_the_emit_barriers_the_overlap_is_lost(plans, target):
    tied, plain = plans(target), plans(target, barriers=False)
    assert not plain.barriers and plain.decomposition == {}
    assert plain.overlap_coverage < 0.5 <= tied.overlap_coverage


def test_schedule_prints_and_exports(plans, tmp_path):
    schedule = plans("h100")
    text = schedule.pprint()
    assert "coverage: planned" in text and "p10:psum" in text
    trace = json.loads(schedule.to_chrome_trace(tmp_path / "step.json").read_text())
    assert trace["traceEvents"]
    assert schedule.plot(tmp_path / "step.png").stat().st_size > 0
    assert "all-reduce-start" in schedule.hlo_text
    assert schedule.switch_points == schedule.primary.switch_points()
    assert schedule.matched_pairs and all(pieces for _, pieces in schedule.matched_pairs)
    assert "sustained:" in text


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_the_sustained_run_carries_the_whole_prefill(plans, target):
    schedule = plans(target)
    run = schedule.sustained
    assert run.secondary_s == pytest.approx(schedule.sequential_s - schedule.primary.duration_s)
    assert run.steps > 1  # one step's windows take only the start of a 1024-token prefill
    # No plan beats the bound of its contention and budget (the default 1.25 and 5%).
    assert 1.0 <= run.ratio <= throughput_bound(Contention(), 0.05) + 1e-9


def test_secondary_all_reduce_pieces_run_async_under_primary_compute():
    """SmolLM2's small layers (8 of them): the first step reaches the prefill's first
    all-reduce, whose head pieces the planner puts in the primary's compute windows; the
    last piece, the rows no window of this step took, runs after the primary. Compiled for
    the A100, every piece in a window is an async all-reduce with primary compute inside."""
    config = LlamaConfig.preset("smollm2-135m", num_layers=8)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    schedule = ligerize(model).plan(PRIMARY, SECONDARY, target="a100-pcie", num_devices=3)
    (cut,) = [k for k in schedule.decomposition if k.endswith(":psum")]
    pieces = [r for r in schedule.coverage.records if "jit(ligerjax_piece)/psum" in r.op_name]
    assert len(pieces) == schedule.decomposition[cut] >= 2
    for record in pieces[:-1]:
        assert not record.selected  # the secondary's
        assert record.is_async and record.compute_names, record
