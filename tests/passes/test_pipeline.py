"""The pipeline pass: stage balancing, cut points, numerics against the unmodified model,
the GPipe schedule's collectives, per-device weight memory, and bad inputs."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from ligerjax.compiler import PassContext, PassManager, ir, trace_module
from models import Llama, LlamaConfig
from passes.pipeline import pipeline, pipeline_pass, stage_cuts
from passes.tensor_parallel import tensor_parallel_pass

pytestmark = pytest.mark.multidevice

LAYERS = 4
TOKENS = jnp.arange(24, dtype=jnp.int32).reshape(4, 6) * 7 % 256  # [B, T]


def _mesh(pp: int, tp: int = 1) -> jax.sharding.Mesh:
    devices = np.array(jax.devices()[: pp * tp]).reshape(pp, tp)
    return jax.sharding.Mesh(devices, ("pp", "tp"))


def _close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def llama():
    """A 4-layer tiny Llama (8 heads, 4 KV heads: splits over tp=2 and tp=4), its trace and
    the unmodified model's logits on TOKENS."""
    cfg = LlamaConfig.preset("tiny", num_layers=LAYERS, num_heads=8, num_kv_heads=4)
    traced = trace_module(Llama(cfg, rngs=nnx.Rngs(0)), TOKENS)
    return traced, traced(traced.weights, TOKENS)


@pytest.fixture(scope="module")
def build(llama):
    """``build(pp, tp, m)``: the Llama through [tensor_parallel,] pipeline (memoised: the
    numerics, structure and memory tests share one compile per configuration)."""
    traced, _ = llama

    @functools.cache
    def run(pp: int, tp: int, m: int):
        passes = [pipeline_pass] if tp == 1 else [tensor_parallel_pass, pipeline_pass]
        ctx = PassContext(mesh=_mesh(pp, tp), pp_axis="pp", num_microbatches=m)
        program, reports = PassManager(passes).run(traced, ctx)
        return program, reports

    return run


def _layers_of(stage) -> set[int]:
    return {int(p.split(".")[1]) for p in stage.weight_paths if p.startswith("layers.")}


# -- stage_cuts --------------------------------------------------------------------------------


def test_stage_cuts_exact_answers():
    assert stage_cuts([1, 1, 1, 1], 2) == (0, 2, 4)
    assert stage_cuts([1, 2, 3, 4, 5], 1) == (0, 5)
    assert stage_cuts([1, 2, 3, 4, 5], 5) == (0, 1, 2, 3, 4, 5)
    assert stage_cuts([1, 2, 3, 4, 5], 2) == (0, 3, 5)  # 6 | 9
    assert stage_cuts([7, 2, 5, 10, 8], 2) == (0, 3, 5)  # 14 | 18


def test_stage_cuts_beats_equal_count_and_greedy_splits():
    # Equal counts (3 | 2 units) give max(6, 2) = 6; the DP puts the heavy unit alone: 4.
    assert stage_cuts([4, 1, 1, 1, 1], 2) == (0, 1, 5)
    # Greedy filling while under the mean (4) gives [1] [4, 1, 1, 1]: 7; equal counts
    # [1, 4, 1] [1, 1]: 6; the DP [1, 4] [1, 1, 1]: 5.
    assert stage_cuts([1, 4, 1, 1, 1], 2) == (0, 2, 5)


def test_stage_cuts_breaks_ties_with_the_earliest_cut():
    assert stage_cuts([2, 1, 2], 2) == (0, 1, 3)  # [2] [1, 2] and [2, 1] [2] tie at 3
    assert stage_cuts([0, 0, 0, 0], 3) == (0, 1, 2, 4)


@given(st.lists(st.integers(0, 20), min_size=1, max_size=8), st.data())
def test_stage_cuts_is_optimal_against_brute_force(costs, data):
    k = data.draw(st.integers(1, len(costs)))
    bounds = stage_cuts(costs, k)
    assert bounds[0] == 0 and bounds[-1] == len(costs) and len(bounds) == k + 1
    assert all(a < b for a, b in itertools.pairwise(bounds))
    got = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
    best = min(
        max(sum(costs[a:b]) for a, b in itertools.pairwise((0, *cuts, len(costs))))
        for cuts in itertools.combinations(range(1, len(costs)), k - 1)
    )
    assert got == best


@pytest.mark.parametrize("k", [0, 4])
def test_stage_cuts_rejects_a_bad_stage_count(k):
    with pytest.raises(ValueError, match=f"num_stages={k}.*len\\(costs\\)=3"):
        stage_cuts([1, 2, 3], k)


# -- Llama ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pp", "m"), [(2, 1), (4, 2)])
def test_llama_pipeline_matches_the_original(llama, build, pp, m):
    traced, want = llama
    program, (report,) = build(pp, 1, m)
    _close(program(traced.weights, TOKENS), want)
    counts = ir.count_primitives(program.jaxpr)
    assert program.ticks == m + pp - 1
    # One carried value (the residual stream), moved after every tick but the last.
    assert len(program.carried) == 1
    assert counts["ppermute"] == (m + pp - 2) * len(program.carried)
    assert report.rewrites["ppermute"] == counts["ppermute"]
    assert counts["all_gather"] == 0 and counts["psum"] == 0
    top = ir.count_primitives(program.jaxpr, recursive=False)
    assert top["cond"] == program.ticks  # one switch over the stages per tick
    assert report.fallbacks == {}
    # Positions and RoPE tables are recomputed by later stages, not carried.
    assert report.rewrites["recomputed_eqns"] > 0


@pytest.mark.parametrize(("pp", "m"), [(2, 1), (4, 2)])
def test_llama_cuts_fall_on_layer_boundaries(build, pp, m):
    program, _ = build(pp, 1, m)
    per_stage = LAYERS // pp
    layers = [_layers_of(s) for s in program.stages]
    assert layers == [set(range(i, i + per_stage)) for i in range(0, LAYERS, per_stage)]
    assert "embed_tokens.embedding" in program.stages[0].weight_paths
    assert "lm_head.kernel" in program.stages[-1].weight_paths
    hidden = (TOKENS.shape[0] // m, TOKENS.shape[1], 64)  # the residual stream [B/m, T, E]
    assert [(c.shape, c.dtype) for c in program.carried] == [(hidden, jnp.float32)]
    paths = [p for s in program.stages for p in s.weight_paths]
    assert sorted(paths) == sorted(program.traced.weight_paths)  # each weight in one stage
    costs = [s.cost_s for s in program.stages]
    assert max(costs) < 1.1 * min(costs)  # layers are equal; embed and head are small


@pytest.mark.parametrize(("pp", "m"), [(2, 1), (4, 2)])
def test_each_device_holds_only_its_stage_weights(llama, build, pp, m):
    traced, _ = llama
    program, _ = build(pp, 1, m)
    buffers = program.pack_weights(traced.weights)
    for b, spec in zip(buffers, program.buffer_specs, strict=True):
        assert b.sharding.spec == spec
    on_device = sum(b.addressable_shards[0].data.nbytes for b in buffers)
    total = sum(w.nbytes for w in traced.weights)
    assert program.total_weight_bytes == total == sum(s.weight_bytes for s in program.stages)
    assert on_device == program.weight_bytes_per_device
    assert on_device == max(s.weight_bytes for s in program.stages)  # one dtype: no slack
    assert on_device < (0.55 if pp == 2 else 0.3) * total
    # Weights are arguments of the program, never constants baked into it.
    assert all(np.size(c) < 64 for c in program.jaxpr.consts)


@pytest.mark.parametrize(("pp", "tp"), [(2, 4), (4, 2)])
@pytest.mark.parametrize("m", [1, 2])
def test_llama_tensor_times_pipeline_parallel(llama, build, pp, tp, m):
    traced, want = llama
    program, (tp_report, pp_report) = build(pp, tp, m)
    _close(program(traced.weights, TOKENS), want)
    assert program.tp_axis == "tp" and tp_report.fallbacks == pp_report.fallbacks == {}
    counts = ir.count_primitives(program.jaxpr)
    assert counts["ppermute"] == (m + pp - 2) * 1
    assert counts["all_gather"] == 0
    # The psums per layer are unchanged: each stage keeps its layers' two all-reduces, and
    # every tick's switch holds every stage once.
    psums = [ir.count_primitives(j)["psum"] for j in program.stage_jaxprs]
    assert psums == [2 * LAYERS // pp] * pp
    assert counts["psum"] == program.ticks * 2 * LAYERS
    # Each device holds a tp shard of its own stage's weights only.
    local = sum(s.weight_bytes for s in program.stages)
    assert program.total_weight_bytes == local < sum(w.nbytes for w in traced.weights)
    assert program.weight_bytes_per_device == max(s.weight_bytes for s in program.stages)
    assert program.weight_bytes_per_device < (0.6 if pp == 2 else 0.35) * local
    buffers = program.pack_weights(traced.weights)
    on_device = sum(b.addressable_shards[0].data.nbytes for b in buffers)
    assert on_device == program.weight_bytes_per_device


# -- stock flax models ------------------------------------------------------------------------


def test_stock_flax_transformer(stock_transformer):
    model, (tokens,), _ = stock_transformer
    traced = trace_module(model, tokens)
    ctx = PassContext(mesh=_mesh(2), pp_axis="pp")
    program, _ = PassManager([pipeline_pass]).run(traced, ctx)
    _close(program(traced.weights, tokens), model(tokens))
    assert ir.count_primitives(program.jaxpr)["ppermute"] == 1
    # Cut at the residual stream after attention: [embed, ln1, attn] | [ln2, fc1, fc2].
    assert {p.split(".")[0] for p in program.stages[0].weight_paths} == {"embed", "ln1", "attn"}
    assert {p.split(".")[0] for p in program.stages[1].weight_paths} == {"ln2", "fc1", "fc2"}


@pytest.mark.parametrize("m", [1, 3])
def test_mlp_stack(mlp_stack, m):
    model, (x,), _ = mlp_stack
    traced = trace_module(model, x)
    ctx = PassContext(mesh=_mesh(2), pp_axis="pp", num_microbatches=m)
    program, _ = PassManager([pipeline_pass]).run(traced, ctx)
    _close(program(traced.weights, x), model(x))
    assert [_layers_of(s) for s in program.stages] == [{0, 1}, {2, 3}]
    assert ir.count_primitives(program.jaxpr)["ppermute"] == m


def test_mlp_stack_tensor_times_pipeline_verified_by_the_pass_manager(mlp_stack):
    model, (x,), rules = mlp_stack
    traced = trace_module(model, x)
    ctx = PassContext(mesh=_mesh(2, 2), pp_axis="pp", partition_rules=rules, debug=True)
    program, _ = PassManager([tensor_parallel_pass, pipeline_pass]).run(traced, ctx)
    _close(program(traced.weights, x), model(x))
    # One Megatron pair (column then row split, one psum) per stage.
    assert [ir.count_primitives(j)["psum"] for j in program.stage_jaxprs] == [1, 1]


class MixedDtypes(nnx.Module):
    """Three Linear layers, the middle one in bf16: two weight buffers (f32 and bf16)."""

    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(16, 16, rngs=rngs)
        self.b = nnx.Linear(16, 16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
        self.c = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.a(x))
        return self.c(jax.nn.relu(self.b(x)).astype(jnp.float32))


def test_one_buffer_per_dtype_padded_to_the_largest_stage():
    model = MixedDtypes(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 16))
    traced = trace_module(model, x)
    program = pipeline(traced, PassContext(mesh=_mesh(2), pp_axis="pp", num_microbatches=2))
    _close(program(traced.weights, x), model(x))
    assert [s.weight_paths for s in program.stages] == [
        ("a.bias", "a.kernel"),
        ("b.bias", "b.kernel", "c.bias", "c.kernel"),
    ]
    # f32: 272 elements in each stage; bf16: 272 in stage 1, stage 0's share is padding.
    assert program.weight_bytes_per_device == 272 * 4 + 272 * 2
    buffers = program.pack_weights(traced.weights)
    assert sorted(str(b.dtype) for b in buffers) == ["bfloat16", "float32"]
    assert sum(b.addressable_shards[0].data.nbytes for b in buffers) == 272 * 6


# -- bad input --------------------------------------------------------------------------------


def test_a_pp_axis_missing_from_the_mesh_raises(mlp_stack):
    traced = trace_module(mlp_stack.model, *mlp_stack.args)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
    with pytest.raises(ValueError, match=r"pp_axis='pp' is not an axis of the mesh \{'tp': 2\}"):
        pipeline(traced, PassContext(mesh=mesh, pp_axis="pp"))
    with pytest.raises(ValueError, match="pp_axis=None"):
        pipeline(traced, PassContext(mesh=_mesh(2)))


def test_more_stages_than_cut_points_raises(stock_transformer):
    traced = trace_module(stock_transformer.model, *stock_transformer.args)
    with pytest.raises(ValueError, match=r"8 stages need 7 cut points.*at most 2"):
        pipeline(traced, PassContext(mesh=_mesh(8), pp_axis="pp"))


def test_a_batch_the_microbatches_do_not_divide_raises(mlp_stack):
    traced = trace_module(mlp_stack.model, *mlp_stack.args)
    ctx = PassContext(mesh=_mesh(2), pp_axis="pp", num_microbatches=2)
    with pytest.raises(ValueError, match=r"argument \[0\] of shape \(3, 16\).*num_microbatches=2"):
        pipeline(traced, ctx)
