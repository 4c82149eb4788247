"""The tensor-parallel pass: numerics against the unmodified model, and its structure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ligerjax.compiler import PassContext, PassManager, ir, trace_module
from models import Llama, LlamaConfig
from passes.partition_rules import resolve_split
from passes.tensor_parallel import tensor_parallel, tensor_parallel_pass

pytestmark = pytest.mark.multidevice


def _mesh(n: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("tp",))


def _close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


TOKENS = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) * 7 % 256


@pytest.mark.parametrize(
    ("n", "kv_heads"), [(2, 8), (4, 8), (8, 8), (2, 4), (4, 4)], ids=lambda x: str(x)
)
def test_llama_matches_the_original(n, kv_heads):
    cfg = LlamaConfig.preset("tiny", num_heads=8, num_kv_heads=kv_heads)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    traced = trace_module(model, TOKENS)
    program, (report,) = PassManager([tensor_parallel_pass]).run(
        traced, PassContext(mesh=_mesh(n), debug=True)
    )
    _close(program(traced.weights, TOKENS), model(TOKENS))
    counts = ir.count_primitives(program.jaxpr)
    assert counts["psum"] == 2 * cfg.num_layers
    assert counts["all_gather"] == 0
    assert report.fallbacks == {}
    assert report.rewrites["attention_local_heads"] == cfg.num_layers


@pytest.mark.parametrize(("n", "kv_heads"), [(4, 2), (8, 4)], ids=lambda x: str(x))
def test_llama_with_replicated_kv_projections(n, kv_heads):
    """Fewer KV heads than devices: K/V projections replicated, each device its KV head."""
    cfg = LlamaConfig.preset("tiny", num_heads=8, num_kv_heads=kv_heads)
    model = Llama(cfg, rngs=nnx.Rngs(4))
    traced = trace_module(model, TOKENS)
    rules = ((r"(k_proj|v_proj)\.kernel$", None),)
    ctx = PassContext(mesh=_mesh(n), partition_rules=rules, debug=True)
    program, (report,) = PassManager([tensor_parallel_pass]).run(traced, ctx)
    _close(program(traced.weights, TOKENS), model(TOKENS))
    assert report.fallbacks == {}
    assert ir.count_primitives(program.jaxpr)["psum"] == 2 * cfg.num_layers


def test_llama_weights_are_split_megatron_style():
    cfg = LlamaConfig.preset("tiny", num_heads=8, num_kv_heads=8)
    traced = trace_module(Llama(cfg, rngs=nnx.Rngs(0)), TOKENS)
    program = tensor_parallel(traced, PassContext(mesh=_mesh(2)))
    specs = dict(zip(traced.weight_paths, program.weight_specs, strict=True))
    assert specs["layers.0.self_attn.q_proj.kernel"] == jax.P(None, "tp")
    assert specs["layers.0.mlp.down_proj.kernel"] == jax.P("tp", None)
    assert specs["embed_tokens.embedding"] == jax.P(None, None)
    assert specs["layers.1.input_layernorm.weight"] == jax.P(None)
    local = {v.aval.shape for v in program.jaxpr.jaxpr.invars}
    assert (64, 64) in local  # q_proj [64, 128] split in two


def test_heads_that_do_not_divide_raise_naming_the_parameter():
    cfg = LlamaConfig.preset("tiny", num_heads=9, num_kv_heads=9)
    traced = trace_module(Llama(cfg, rngs=nnx.Rngs(0)), TOKENS)
    with pytest.raises(ValueError, match=r"q_proj\.kernel.*dim 1.*size 2"):
        tensor_parallel(traced, PassContext(mesh=_mesh(2)))


def test_weight_dim_that_does_not_divide_raises():
    traced = trace_module(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), jnp.ones((2, 4)))
    rules = ((r"^kernel$", 1),)
    with pytest.raises(ValueError, match=r"'kernel' dim 1 \(size 6\).*size 4"):
        tensor_parallel(traced, PassContext(mesh=_mesh(4), partition_rules=rules))


@pytest.mark.parametrize("n", [2, 4])
def test_stock_flax_transformer(n, stock_transformer):
    model, (tokens,), rules = stock_transformer
    traced = trace_module(model, tokens)
    ctx = PassContext(mesh=_mesh(n), partition_rules=rules, debug=True)
    program, (report,) = PassManager([tensor_parallel_pass]).run(traced, ctx)
    _close(program(traced.weights, tokens), model(tokens))
    assert report.fallbacks == {}
    assert ir.count_primitives(program.jaxpr)["psum"] == 2


@pytest.mark.parametrize("n", [2, 4, 8])
def test_mlp_stack(n, mlp_stack):
    model, (x,), rules = mlp_stack
    traced = trace_module(model, x)
    ctx = PassContext(mesh=_mesh(n), partition_rules=rules, debug=True)
    program, (report,) = PassManager([tensor_parallel_pass]).run(traced, ctx)
    _close(program(traced.weights, x), model(x))
    assert ir.count_primitives(program.jaxpr)["psum"] == 2
    assert report.fallbacks == {}


class SortsSplit(nnx.Module):
    """A column-parallel Linear followed by an op with no split rule (sort)."""

    def __init__(self, rngs: nnx.Rngs):
        self.up_proj = nnx.Linear(8, 16, rngs=rngs)

    def __call__(self, x):
        return jnp.sort(self.up_proj(x), axis=-1)


def test_op_without_a_rule_takes_the_gather_default_and_is_reported():
    model = SortsSplit(nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (2, 8))
    traced = trace_module(model, x)
    program, (report,) = PassManager([tensor_parallel_pass]).run(
        traced, PassContext(mesh=_mesh(2), debug=True)
    )
    _close(program(traced.weights, x), model(x))
    assert report.fallbacks == {"sort": 1}
    assert ir.count_primitives(program.jaxpr)["all_gather"] == 1


def test_partition_rules_user_first_then_defaults():
    assert resolve_split("layers.3.mlp.gate_proj.kernel", 2) == 1
    assert resolve_split("layers.3.self_attn.o_proj.kernel", 2) == 0
    assert resolve_split("layers.3.attn.out.kernel", 3) == 0
    assert resolve_split("lm_head.kernel", 2) == 1
    assert resolve_split("lm_head.bias", 1) is None
    assert resolve_split("layers.3.mlp.gate_proj.kernel", 2, ((r"gate_proj", None),)) is None
    with pytest.raises(ValueError, match="dim 5"):
        resolve_split("w", 2, ((r"w", 5),))
