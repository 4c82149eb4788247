"""@ligerize on CPU meshes: numerics against the unmodified model, structure, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ligerjax import ligerize
from ligerjax.compiler import ir
from ligerjax.cost import Contention, CostModel, get_device
from ligerjax.ligerized import InterleavedProgram, Ligerized, LigerizedFunction
from ligerjax.schedule import COMM
from models import Llama, LlamaConfig

pytestmark = pytest.mark.multidevice

P_TOKENS = (jnp.arange(6, dtype=jnp.int32).reshape(1, 6) * 5) % 256  # a decode-sized batch
S_TOKENS = (jnp.arange(64, dtype=jnp.int32).reshape(2, 32) * 7) % 256  # a prefill batch


def _mesh(n: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("tp",))


def _close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


def _llama(kv_heads: int = 4, seed: int = 0) -> Llama:
    cfg = LlamaConfig.preset("tiny", num_heads=8, num_kv_heads=kv_heads)
    return Llama(cfg, rngs=nnx.Rngs(seed))


def _logits(model, tokens):
    return model(tokens)[0]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_llama_call_and_interleaved_match_the_model(n):
    model = _llama(kv_heads=8 if n == 8 else 4)
    lm = ligerize(model, mesh=_mesh(n))
    _close(lm(P_TOKENS), model(P_TOKENS))
    p_out, s_out = lm.interleaved((P_TOKENS,), (S_TOKENS,))
    _close(p_out, model(P_TOKENS))
    _close(s_out, model(S_TOKENS))


def test_interleaved_program_ties_every_primary_all_reduce_to_secondary_work():
    """Planned with H100 costs (on this CPU's costs a 5 us launch fills a 5 us window)."""
    model = _llama()
    layers = model.config.num_layers
    lm = ligerize(model, mesh=_mesh(2), cost_model=CostModel.for_device("h100-sxm"))
    lm.interleaved((P_TOKENS,), (S_TOKENS,))
    (program,) = [p for p in lm._programs.values() if isinstance(p, InterleavedProgram)]
    counts = ir.count_primitives(program.jaxpr, recursive=False)
    assert counts["psum"] == 2 * 2 * layers  # two per layer, per batch
    assert counts["all_gather"] == 0
    step = program.step
    comm_windows = [w for w in step.windows if w.kind == "comm"]
    assert len(comm_windows) == 2 * layers
    tied = [w for w in step.windows if w.primary_ops and w.secondary_ops]
    # Two per filled window, and one holding the tail back until the primary is done.
    assert counts["optimization_barrier"] == 2 * len(tied) + bool(step.tail)
    assert all(w.secondary_ops for w in comm_windows)


def test_interleave_off_gives_the_same_numbers_without_emitted_barriers():
    model = _llama()
    lm = ligerize(model, mesh=_mesh(4), interleave=False)
    p_out, s_out = lm.interleaved((P_TOKENS,), (S_TOKENS,))
    _close((p_out, s_out), (model(P_TOKENS), model(S_TOKENS)))
    (program,) = lm._programs.values()
    assert ir.count_primitives(program.jaxpr)["optimization_barrier"] == 0


@pytest.mark.parametrize("n", [2, 4])
def test_stock_flax_transformer(n, stock_transformer):
    model, (tokens,), rules = stock_transformer
    other = (jnp.arange(24, dtype=jnp.int32).reshape(3, 8) * 3) % 50
    lm = ligerize(model, mesh=_mesh(n), partition_rules=rules)
    _close(lm(tokens), model(tokens))
    _close(lm.interleaved((tokens,), (other,)), (model(tokens), model(other)))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_mlp_stack(n, mlp_stack):
    model, (x,), rules = mlp_stack
    big = jax.random.normal(jax.random.key(5), (40, 16))
    lm = ligerize(model, mesh=_mesh(n), partition_rules=rules)
    _close(lm(x), model(x))
    _close(lm.interleaved((x,), (big,)), (model(x), model(big)))


@pytest.mark.parametrize("n", [2, 4])
def test_secondary_all_reduces_cut_into_primary_compute_windows_keep_the_numbers(n, mlp_stack):
    """A link slow next to the GEMMs (no launch or ring latency, no contention): the
    secondary's all-reduces are longer than the primary's compute windows, so the planner
    cuts them along their rows and the decompose pass emits one all-reduce per piece."""
    model, _, rules = mlp_stack
    spec = get_device("cpu").replace(launch_latency=0.0, link_latency=0.0, link_bandwidth=3e9)
    cost = CostModel(spec, Contention.none())
    lm = ligerize(model, mesh=_mesh(n), partition_rules=rules, cost_model=cost)
    p, s = (jax.random.normal(jax.random.key(k), (256, 16)) for k in (6, 7))
    _close(lm.interleaved((p,), (s,)), (model(p), model(s)))
    (program,) = [p for p in lm._programs.values() if isinstance(p, InterleavedProgram)]
    asm = program.step.assembled
    cut = [
        q for q in program.step.pieces if q.rows is not None and asm.secondary[q.op].kind is COMM
    ]
    assert len(cut) >= 2
    cut_ops = {q.op for q in cut}
    psums = ir.count_primitives(program.jaxpr)["psum"]  # the pieces' psums sit in their jits
    assert psums == 2 + 2 - len(cut_ops) + len(cut)  # primary's 2, secondary's uncut + pieces


def test_class_decorator_makes_ligerized_instances(mlp_stack):
    model, (x,), rules = mlp_stack

    @ligerize(mesh=_mesh(2), partition_rules=rules)
    class Wrapped(type(model)):
        pass

    lm = Wrapped(nnx.Rngs(2))
    assert isinstance(lm, Ligerized)
    _close(lm(x), lm.model(x))


def test_function_form_takes_the_model_first():
    model = _llama()

    @ligerize(mesh=_mesh(2))
    def last_logits(m, tokens):
        return m(tokens)[0][:, -1]

    assert isinstance(last_logits, LigerizedFunction)
    _close(last_logits(model, S_TOKENS), model(S_TOKENS)[0][:, -1])
    p_out, s_out = last_logits.interleaved(model, (P_TOKENS,), (S_TOKENS,))
    _close((p_out, s_out), (model(P_TOKENS)[0][:, -1], model(S_TOKENS)[0][:, -1]))


def test_weights_are_read_at_every_call(mlp_stack):
    model, (x,), rules = mlp_stack
    lm = ligerize(model, mesh=_mesh(2), partition_rules=rules)
    before = lm(x)
    model.layers[0].kernel[...] = model.layers[0].kernel[...] * 2
    after = lm(x)
    _close(after, model(x))
    assert not np.allclose(np.asarray(before), np.asarray(after))


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary", "secondary", "match"),
    [
        ((P_TOKENS,), (S_TOKENS, S_TOKENS), "differ in structure"),
        ((P_TOKENS,), (S_TOKENS[0],), r"argument 0 has 2 dims .* but 1"),
        ((P_TOKENS,), (S_TOKENS.astype(jnp.float32),), "argument 0 is int32 .* float32"),
        (P_TOKENS, (S_TOKENS,), "primary_args must be a tuple"),
    ],
)
def test_mismatched_batches_are_rejected(primary, secondary, match):
    lm = ligerize(_llama(), mesh=_mesh(2))
    with pytest.raises(ValueError, match=match):
        lm.interleaved(primary, secondary)


def test_mesh_axis_that_does_not_divide_names_the_parameter():
    cfg = LlamaConfig.preset("tiny", num_heads=6, num_kv_heads=6)
    lm = ligerize(Llama(cfg, rngs=nnx.Rngs(0)), mesh=_mesh(4))
    with pytest.raises(ValueError, match=r"q_proj\.kernel.*size 4.*dim 2 of size 6"):
        lm(P_TOKENS)


def test_bad_keywords_are_named():
    with pytest.raises(ValueError, match="tp_axis='model' is not an axis"):
        ligerize(_llama(), mesh=_mesh(2), tp_axis="model")
    with pytest.raises(ValueError, match=r"not a jax\.sharding\.Mesh"):
        ligerize(_llama(), mesh="tp")
    with pytest.raises(ValueError, match=r"neither an nnx\.Module"):
        ligerize(42, mesh=_mesh(2))


# -- pipeline and tensor × pipeline parallelism -------------------------------------------


def _grid(pp: int, tp: int) -> jax.sharding.Mesh:
    devices = np.array(jax.devices()[: pp * tp]).reshape(pp, tp)
    return jax.sharding.Mesh(devices, ("pp", "tp"))


@pytest.mark.parametrize(("pp", "tp"), [(2, 1), (4, 1), (2, 4), (4, 2)])
def test_llama_pipeline_and_tp_x_pp_match_the_model(pp, tp):
    cfg = LlamaConfig.preset("tiny", num_layers=4, num_heads=8, num_kv_heads=4)
    model = Llama(cfg, rngs=nnx.Rngs(3))
    lm = ligerize(model, mesh=_grid(pp, tp), pp_axis="pp")
    _close(lm(P_TOKENS), model(P_TOKENS))
    p_out, s_out = lm.interleaved((P_TOKENS,), (S_TOKENS,))
    _close((p_out, s_out), (model(P_TOKENS), model(S_TOKENS)))


def test_pipeline_on_the_mlp_stack(mlp_stack):
    model, (x,), rules = mlp_stack
    lm = ligerize(model, mesh=_grid(2, 2), pp_axis="pp", partition_rules=rules)
    big = jax.random.normal(jax.random.key(6), (8, 16))
    _close(lm(x), model(x))
    _close(lm.interleaved((x,), (big,)), (model(x), model(big)))


def test_strict_mode_names_the_primitive_without_a_rule_and_the_split_parameter():
    class SortsSplit(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.up_proj = nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, x):
            return jnp.sort(self.up_proj(x), axis=-1)

    model, x = SortsSplit(nnx.Rngs(3)), jnp.ones((2, 8))
    _close(ligerize(model, mesh=_mesh(2))(x), model(x))  # default: all-gather, correct
    with pytest.raises(ValueError, match=r"'sort' has no split rule.*up_proj\.kernel.*dim 1"):
        ligerize(model, mesh=_mesh(2), strict=True)(x)


def test_pipeline_on_the_stock_flax_transformer(stock_transformer):
    model, (tokens,), rules = stock_transformer
    other = (jnp.arange(24, dtype=jnp.int32).reshape(3, 8) * 3) % 50
    lm = ligerize(model, mesh=_grid(2, 1), pp_axis="pp", partition_rules=rules)
    _close(lm(tokens), model(tokens))
    _close(lm.interleaved((tokens,), (other,)), (model(tokens), model(other)))


def test_the_interleaved_step_dumps_its_jaxpr_after_each_pass(mlp_stack, tmp_path, monkeypatch):
    model, (x,), rules = mlp_stack
    monkeypatch.setenv("LIGERJAX_DUMP_DIR", str(tmp_path))
    ligerize(model, mesh=_mesh(2), partition_rules=rules).interleaved((x,), (x * 2,))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00_interleaved_traced.jaxpr.txt",
        "01_interleaved_tensor_parallel.jaxpr.txt",
        "02_interleaved_decompose.jaxpr.txt",
        "03_interleaved_emit.jaxpr.txt",
    ]
    assert "psum" in (tmp_path / "03_interleaved_emit.jaxpr.txt").read_text()


@pytest.mark.parametrize(("pp", "tp"), [(2, 1), (2, 2)])
def test_llama_pipeline_with_micro_batches_matches_the_model(pp, tp):
    """Micro-batches re-trace the step at their shape, through the attention pass again."""
    cfg = LlamaConfig.preset("tiny", num_layers=4, num_heads=8, num_kv_heads=4)
    model = Llama(cfg, rngs=nnx.Rngs(4))
    lm = ligerize(model, mesh=_grid(pp, tp), pp_axis="pp", num_microbatches=2)
    primary = jnp.concatenate([P_TOKENS, P_TOKENS[:, ::-1]])  # [2, 6]
    _close(lm(primary), model(primary))
    _close(lm.interleaved((primary,), (S_TOKENS,)), (model(primary), model(S_TOKENS)))


def test_compiler_options_apply_at_the_top_level_and_give_way_inside_a_users_jit():
    from ligerjax.ligerized import OptionedJit

    run = OptionedJit(lambda x: x * 2 + 1, {"xla_cpu_enable_fast_math": False})
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(run(x), x * 2 + 1)
    np.testing.assert_array_equal(jax.jit(lambda y: run(y) - 1)(x), x * 2)


def test_the_interleaved_step_runs_inside_a_users_jit():
    model = _llama()
    lm = ligerize(model, mesh=_mesh(2))
    p_out, s_out = jax.jit(lambda p, s: lm.interleaved((p,), (s,)))(P_TOKENS, S_TOKENS)
    _close((p_out, s_out), (model(P_TOKENS), model(S_TOKENS)))
