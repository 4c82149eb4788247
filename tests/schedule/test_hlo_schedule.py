"""Reading a scheduled HLO back: parser, pricing, overlap coverage; real deviceless compiles."""

# ruff: noqa: E501  (the handwritten HLO snippets keep XLA's one-instruction-per-line form)

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ligerjax.cost import CostModel, DeviceSpec
from ligerjax.schedule.hlo_schedule import (
    instr_cost,
    is_primary_scope,
    overlap_coverage,
    parse_hlo,
    parse_instr,
    parse_shape,
)

# Round numbers: 1 TFLOP/s, 1 TB/s memory, 1.2 GB/s links, no latencies, full efficiency.
TOY = CostModel(
    DeviceSpec(
        name="toy",
        vendor="nvidia",
        peak_flops=(("bfloat16", 1e12), ("float32", 1e12)),
        memory_bandwidth=1e12,
        link_bandwidth=1.2e9,
        link_latency=0.0,
        launch_latency=0.0,
        memory_bytes=1e9,
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        link_efficiency=1.0,
    )
)

# Primary: a fused [10,100]x[100,200] GEMM, then its all-reduce over 4 devices. Inside the
# window: a secondary cuBLAS [50,100]x[100,200] GEMM and a copy fusion. Then a secondary
# collective-permute with nothing inside, and a synchronous all-reduce over groups of 2.
SNIPPET = r"""HloModule jit_step, is_scheduled=true, entry_computation_layout={(bf16[10,100]{1,0}, /*index=1*/bf16[100,200]{1,0})->bf16[10,200]{1,0}}, num_partitions=4

FileNames
1 "step.py"

%fused_gemm (p0: bf16[10,100], p1: bf16[100,200]) -> bf16[10,200] {
  %p0 = bf16[10,100]{1,0} parameter(0)
  %p1 = bf16[100,200]{1,0} parameter(1)
  ROOT %dot.1 = bf16[10,200]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/primary/dot_general"}
}

%copy_fusion (q0: bf16[50,200]) -> bf16[50,200] {
  %q0 = bf16[50,200]{1,0} parameter(0)
  ROOT %neg = bf16[50,200]{1,0} negate(%q0)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main.0_spmd (x: bf16[10,100], w: bf16[100,200], xs: bf16[50,100], ws: bf16[100,200], z: f32[2,2]) -> bf16[10,200] {
  %x = bf16[10,100]{1,0} parameter(0), sharding={replicated}, metadata={op_name="x"}
  %w = bf16[100,200]{1,0} parameter(1), sharding={devices=[1,4]<=[4]}, metadata={op_name="w"}
  %gemm_fusion = bf16[10,200]{1,0} fusion(%x, /*index=1*/%w), kind=kCustom, calls=%fused_gemm, metadata={op_name="jit(step)/shard_map/primary/dot_general" scheduling_name="gemm_fusion"}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm","note":"a } in a string"}}
  %all-reduce-start = bf16[10,200]{1,0} all-reduce-start(%gemm_fusion), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(step)/shard_map/primary/psum_invariant"}, backend_config={"collective_backend_config":{"is_sync":false}}
  %xs = bf16[50,100]{1,0} parameter(2), metadata={op_name="xs"}
  %ws = bf16[100,200]{1,0} parameter(3), metadata={op_name="ws"}
  %custom-call.1 = (bf16[50,200]{1,0}, s8[4194304]{0}) custom-call(%xs, %ws), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/shard_map/secondary/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %gte = bf16[50,200]{1,0} get-tuple-element(%custom-call.1), index=0, metadata={op_name="jit(step)/shard_map/secondary/dot_general"}
  %loop_fusion = bf16[50,200]{1,0} fusion(%gte), kind=kLoop, calls=%copy_fusion, metadata={op_name="jit(step)/shard_map/secondary/neg"}
  %all-reduce-done = bf16[10,200]{1,0} all-reduce-done(%all-reduce-start), metadata={op_name="jit(step)/shard_map/primary/psum_invariant"}
  %collective-permute-start = (bf16[50,200]{1,0}, bf16[50,200]{1,0}) collective-permute-start(%loop_fusion), channel_id=2, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}, metadata={op_name="jit(step)/shard_map/secondary/ppermute"}
  %collective-permute-done = bf16[50,200]{1,0} collective-permute-done(%collective-permute-start), metadata={op_name="jit(step)/shard_map/secondary/ppermute"}
  %z = f32[2,2]{1,0} parameter(4)
  %all-reduce.2 = f32[2,2]{1,0} all-reduce(%z), channel_id=3, replica_groups=[2,2]<=[4], to_apply=%add, metadata={op_name="jit(step)/shard_map/secondary/psum"}
  ROOT %tuple = (bf16[10,200]{1,0}, bf16[50,200]{1,0}, f32[2,2]{1,0}) tuple(%all-reduce-done, %collective-permute-done, %all-reduce.2)
}
"""

PRIMARY_AR_S = 2 * 3 / 4 * (10 * 200 * 2) / 1.2e9  # 5 us
SECONDARY_GEMM_S = 2 * 50 * 200 * 100 / 1e12  # 2 us (compute bound)
COPY_S = (50 * 200 * 2) * 2 / 1e12  # bytes in + out
PERMUTE_S = 50 * 200 * 2 / 1.2e9
SYNC_AR_S = 2 * 1 / 2 * 16 / 1.2e9


def test_parser_reads_the_entry_in_schedule_order_with_metadata_and_targets():
    module = parse_hlo(SNIPPET)
    assert module.is_scheduled and module.num_partitions == 4 and module.name == "jit_step"
    assert set(module.computations) == {"fused_gemm", "copy_fusion", "add", "main.0_spmd"}
    names = [i.name for i in module.entry.instrs]
    assert names[:4] == ["x", "w", "gemm_fusion", "all-reduce-start"]
    assert names[-1] == "tuple" and module.entry["tuple"].is_root
    gemm = module.entry["gemm_fusion"]
    assert gemm.operands == ("x", "w") and gemm.called == ("fused_gemm",)
    assert gemm.op_name == "jit(step)/shard_map/primary/dot_general"
    assert gemm.backend_config["fusion_backend_config"]["note"] == "a } in a string"
    cublas = module.entry["custom-call.1"]
    assert cublas.custom_call_target == "__cublas$lt$matmul"
    assert [str(s) for s in cublas.shapes] == ["bf16[50,200]", "s8[4194304]"]
    assert module.entry["all-reduce-start"].replica_groups == ((0, 1, 2, 3),)
    assert module.entry["all-reduce.2"].group_size(default=4) == 2


def test_starts_pair_with_their_dones():
    pairs = parse_hlo(SNIPPET).pairs
    assert [(p.start, p.done, p.kind) for p in pairs] == [
        ("all-reduce-start", "all-reduce-done", "all_reduce"),
        ("collective-permute-start", "collective-permute-done", "permute"),
    ]
    assert [(p.start_index, p.done_index) for p in pairs] == [(3, 9), (10, 11)]


def test_gemms_are_priced_by_flops_and_other_kernels_by_bytes():
    module = parse_hlo(SNIPPET)
    entry = module.entry
    fused = instr_cost(module, entry, entry["gemm_fusion"], TOY)
    assert fused.kind == "gemm" and fused.flops == 2 * 10 * 200 * 100
    assert fused.duration_s == pytest.approx(4e5 / 1e12)
    cublas = instr_cost(module, entry, entry["custom-call.1"], TOY)
    assert cublas.kind == "gemm" and cublas.duration_s == pytest.approx(SECONDARY_GEMM_S)
    copy = instr_cost(module, entry, entry["loop_fusion"], TOY)
    assert copy.kind == "compute" and copy.duration_s == pytest.approx(COPY_S)
    assert instr_cost(module, entry, entry["gte"], TOY).kind == "free"
    ar = instr_cost(module, entry, entry["all-reduce-start"], TOY)
    assert ar.kind == "comm" and ar.duration_s == pytest.approx(PRIMARY_AR_S)
    permute = instr_cost(module, entry, entry["collective-permute-start"], TOY)
    assert permute.duration_s == pytest.approx(PERMUTE_S)
    assert instr_cost(module, entry, entry["all-reduce.2"], TOY).duration_s == pytest.approx(
        SYNC_AR_S
    )


def test_coverage_counts_compute_between_start_and_done_for_primary_collectives():
    cov = overlap_coverage(SNIPPET, TOY, is_primary=is_primary_scope("primary"))
    by_name = {r.name: r for r in cov.records}
    primary = by_name["all-reduce-start"]
    assert primary.selected and primary.is_async and primary.done == "all-reduce-done"
    assert primary.compute_names == ("custom-call.1", "loop_fusion")
    assert primary.compute_inside_s == pytest.approx(SECONDARY_GEMM_S + COPY_S)
    assert primary.covered_s == pytest.approx(SECONDARY_GEMM_S + COPY_S)
    assert cov.coverage == pytest.approx((SECONDARY_GEMM_S + COPY_S) / PRIMARY_AR_S)
    permute = by_name["collective-permute-start"]
    assert not permute.selected and permute.is_async and permute.compute_inside_s == 0
    sync = by_name["all-reduce.2"]
    assert not sync.is_async and sync.covered_s == 0 and sync.kind == "all_reduce"


def test_coverage_over_all_collectives_without_a_predicate():
    cov = overlap_coverage(SNIPPET, TOY)
    total = PRIMARY_AR_S + PERMUTE_S + SYNC_AR_S
    assert cov.total_s == pytest.approx(total)
    assert cov.coverage == pytest.approx((SECONDARY_GEMM_S + COPY_S) / total)
    assert "coverage=" in str(cov)


def test_a_predicate_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match="selected none"):
        overlap_coverage(SNIPPET, TOY, is_primary=is_primary_scope("tertiary"))


def test_covered_time_is_capped_by_the_collective_duration():
    slow_gemm = SNIPPET.replace("bf16[50,100]", "bf16[50000,100]")
    slow_gemm = slow_gemm.replace("bf16[50,200]", "bf16[50000,200]")
    cov = overlap_coverage(slow_gemm, TOY, is_primary=is_primary_scope("primary"))
    primary = cov.selected[0]
    assert primary.compute_inside_s > primary.duration_s
    assert primary.covered_s == primary.duration_s and cov.coverage == pytest.approx(1.0)
    assert primary.overrun_s == pytest.approx(primary.compute_inside_s - primary.duration_s)
    assert cov.overrun_s == primary.overrun_s and cov.exposed_s == pytest.approx(0.0)


# A merged all-reduce of both batches (XLA's combiner) and an async call on stream 1.
MERGED = r"""HloModule m, is_scheduled=true, num_partitions=2

%sec (a: bf16[100,100], b: bf16[100,100]) -> bf16[100,100] {
  %a = bf16[100,100]{1,0} parameter(0)
  %b = bf16[100,100]{1,0} parameter(1)
  ROOT %d = bf16[100,100]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cat (c0: bf16[4], c1: bf16[4]) -> bf16[8] {
  %c0 = bf16[4]{0} parameter(0)
  %c1 = bf16[4]{0} parameter(1)
  ROOT %c = bf16[8]{0} concatenate(%c0, %c1), dimensions={0}
}

ENTRY %main (p: bf16[4], s: bf16[4], a: bf16[100,100]) -> bf16[8] {
  %p = bf16[4]{0} parameter(0), metadata={op_name="jit(f)/primary/mul"}
  %s = bf16[4]{0} parameter(1), metadata={op_name="jit(f)/secondary/mul"}
  %a = bf16[100,100]{1,0} parameter(2)
  %call-start = ((bf16[100,100]{1,0}, bf16[100,100]{1,0}), bf16[100,100]{1,0}) call-start(%a, %a), to_apply=%sec, frontend_attributes={_xla_stream_annotation="1"}, metadata={op_name="jit(f)/secondary/jit(sec)"}
  %wrapped_concatenate = bf16[8]{0} fusion(%p, %s), kind=kLoop, calls=%cat
  %all-reduce-start = bf16[8]{0} all-reduce-start(%wrapped_concatenate), replica_groups={}, to_apply=%sec
  %call-done = bf16[100,100]{1,0} call-done(%call-start)
  %all-reduce-done = bf16[8]{0} all-reduce-done(%all-reduce-start)
  ROOT %t = (bf16[8]{0}, bf16[100,100]{1,0}) tuple(%all-reduce-done, %call-done)
}
"""


def test_an_untagged_merged_collective_inherits_both_scopes():
    start = parse_hlo(MERGED).entry["all-reduce-start"]
    assert start.op_name == ""
    assert start.scopes == ("jit(f)/primary/mul", "jit(f)/secondary/mul")
    assert is_primary_scope("primary")(start) and is_primary_scope("secondary")(start)


def test_an_async_call_overlapping_the_window_counts_as_compute_inside():
    cov = overlap_coverage(MERGED, TOY, is_primary=is_primary_scope("primary"))
    (record,) = cov.records
    assert record.kind == "all_reduce" and record.is_async
    assert record.compute_names == ("call-start",)
    dot_s = 2 * 100 * 100 * 100 / 1e12
    assert record.compute_inside_s == pytest.approx(dot_s)
    assert record.duration_s == pytest.approx(2 * 1 / 2 * 16 / 1.2e9)  # n = num_partitions


def test_parser_tolerates_tuples_layouts_and_comments():
    instr = parse_instr(
        "  ROOT %t.1 = ((f32[2,3]{1,0:T(8,128)}, /*index=1*/s32[]), pred[4]{0}) "
        'tuple(%a, /*index=1*/%b.2, %c), metadata={op_name="x/y"}',
        7,
    )
    assert instr is not None and instr.is_root and instr.index == 7
    assert [str(s) for s in instr.shapes] == ["f32[2,3]", "s32[]", "pred[4]"]
    assert instr.operands == ("a", "b.2", "c") and instr.op_name == "x/y"
    assert parse_shape("bf16[2,4]{1,0}")[0].nbytes == 16
    assert parse_instr("FileNames", 0) is None
    cond = parse_instr("c = f32[] conditional(p, a, b), branch_computations={br0, br1}", 0)
    assert cond is not None and cond.called == ("br0", "br1")


# -- real deviceless compiles ----------------------------------------------------------------

E, TOKENS_P, TOKENS_S = 4096, 32, 2048


def _two_batches(mesh):
    """Independent primary (32 tokens, MLP pair + psum) and secondary (2048 tokens, GEMMs)."""

    def step(x_p, w1_p, w2_p, x_s, w1_s, w2_s):
        with jax.named_scope("primary"):
            y_p = jax.lax.psum((x_p @ w1_p) @ w2_p, "tp")
        with jax.named_scope("secondary"):
            y_s = (x_s @ w1_s) @ w2_s
        return y_p, y_s

    col, row = P(None, "tp"), P("tp", None)
    fn = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), col, row, P(), col, row),
        out_specs=(P(), P("tp")),
    )

    def arg(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

    args = (
        arg((TOKENS_P, E), P()),
        arg((E, E), col),
        arg((E, E), row),
        arg((TOKENS_S, E), P()),
        arg((E, E), col),
        arg((E, E), row),
    )
    return fn, args


@pytest.mark.deviceless
@pytest.mark.parametrize("target", ["h100", "a100"])
def test_secondary_gemms_run_inside_the_primary_all_reduce(target):
    from ligerjax.compiler.deviceless import TARGETS, compile_text, gpu_mesh

    fn, args = _two_batches(gpu_mesh(target, 4))
    out = compile_text(fn, *args, target=target)
    module = parse_hlo(out.text)
    cost = CostModel.for_device(TARGETS[target].cost_device)
    cov = overlap_coverage(module, cost, is_primary=is_primary_scope("primary"))
    (primary,) = cov.selected
    assert primary.kind == "all_reduce" and primary.is_async
    assert "/primary/" in primary.op_name
    inside = [module.entry[n] for n in primary.compute_names]
    secondary_gemms = [
        i
        for i in inside
        if is_primary_scope("secondary")(i)
        and instr_cost(module, module.entry, i, cost).kind == "gemm"
    ]
    assert len(secondary_gemms) == 2
    assert cov.coverage > 0


@pytest.mark.deviceless
def test_every_async_collective_kind_pairs_and_is_priced_on_h100():
    from ligerjax.compiler.deviceless import compile_text, gpu_mesh

    mesh = gpu_mesh("h100", 4)
    ring = [(i, (i + 1) % 4) for i in range(4)]

    def step(x, w, y):
        g = jax.lax.all_gather(x, "tp", tiled=True)  # [512, 1024]
        r = jax.lax.psum_scatter(g @ w, "tp", tiled=True)  # [128, 1024]
        return jax.lax.ppermute(r, "tp", ring), jax.lax.all_to_all(y, "tp", 0, 1, tiled=True)

    fn = jax.shard_map(
        step, mesh=mesh, in_specs=(P("tp"), P(), P("tp")), out_specs=(P("tp"), P("tp"))
    )

    def arg(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

    text = compile_text(
        fn,
        arg((512, 1024), P("tp")),
        arg((1024, 1024), P()),
        arg((1024, 1024), P("tp")),
        target="h100",
    ).text
    module = parse_hlo(text)
    assert {p.kind for p in module.pairs} == {
        "all_gather",
        "reduce_scatter",
        "permute",
        "all_to_all",
    }
    cost = CostModel.for_device("h100-sxm")
    by_kind = {r.kind: r for r in overlap_coverage(module, cost).records}
    mib = 512 * 1024 * 2  # the gathered all-gather output, the reduce-scatter input
    assert by_kind["all_gather"].duration_s == pytest.approx(cost.all_gather(mib, 4))
    assert by_kind["reduce_scatter"].duration_s == pytest.approx(cost.reduce_scatter(mib, 4))
    assert by_kind["permute"].duration_s == pytest.approx(cost.permute(mib // 4))


def test_long_form_operands_and_async_copies_are_read():
    text = (
        "HloModule m\n\nENTRY %e (a: f32[4]) -> f32[4] {\n"
        "  a = f32[4]{0} parameter(0)\n"
        "  cs = (f32[4]{0}, f32[4]{0}, u32[]) copy-start(f32[4]{0} a)\n"
        "  cd = f32[4]{0} copy-done((f32[4]{0}, f32[4]{0}, u32[]) cs)\n"
        "  ROOT n = f32[4]{0} negate(f32[4]{0} cd)\n}\n"
    )
    module = parse_hlo(text)
    assert module.entry["cd"].operands == ("cs",) and module.entry["n"].operands == ("cd",)
    assert [(p.start, p.done, p.kind) for p in module.pairs] == [("cs", "cd", "copy")]
    assert overlap_coverage(module, TOY).records == ()
