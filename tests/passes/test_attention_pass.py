"""The attention pass: named calls routed, hand-written softmax(QKᵀ)V replaced, numerics kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ligerjax import ops
from ligerjax.compiler import PassContext, PassManager, ir, trace_module
from models import Llama, LlamaConfig
from passes.attention import AttentionProgram, attention, attention_pass
from passes.tensor_parallel import tensor_parallel_pass

TOKENS = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) * 7 % 256
B, T, H, D = 2, 7, 4, 8


def _close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


def _attention_eqns(jaxpr) -> list:
    return [e for e in ir.iter_eqns(jaxpr) if ir.eqn_name(e) == ops.ATTENTION_NAME]


def _qkv(seed: int = 0, s: int = T):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, T, H, D)),
        jax.random.normal(kk, (B, s, H, D)),
        jax.random.normal(kv, (B, s, H, D)),
    )


class Fn(nnx.Module):
    """A parameter-free module around a function, so that it traces like a model."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def _run(fn, *args) -> tuple[AttentionProgram, object]:
    traced = trace_module(Fn(fn), *args)
    before = str(traced.jaxpr)
    program, (report,) = PassManager([attention_pass]).run(traced, PassContext(debug=True))
    assert str(traced.jaxpr) == before  # the input is never mutated
    _close(program(traced.weights, *args), fn(*args))
    return program, report


# -- the named op ------------------------------------------------------------------------------


def test_attention_params_are_read_from_the_jaxpr_not_run():
    q, k, v = _qkv()
    jaxpr = jax.make_jaxpr(lambda q, k, v: ops.attention(q, k, v, causal=False, sm_scale=0.3))(
        q, k, v
    )
    (eqn,) = _attention_eqns(jaxpr)
    assert ops.is_attention(eqn)
    assert ops.attention_params(eqn) == ops.AttentionParams(causal=False, sm_scale=0.3)
    name = ops.attention_params_name(True, D**-0.5)
    assert ops.parse_attention_params_name(name) == (True, D**-0.5)
    assert ops.parse_attention_params_name("ligerjax_attention_other") is None


def test_llama_has_one_routed_attention_per_layer():
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    traced = trace_module(model, TOKENS)
    program, (report,) = PassManager([attention_pass]).run(traced, PassContext(debug=True))
    assert report.rewrites == {"ligerjax_attention_routed": cfg.num_layers}
    assert report.fallbacks == {}
    eqns = _attention_eqns(program.jaxpr)
    assert len(eqns) == cfg.num_layers
    head_dim = cfg.hidden_size // cfg.num_heads
    assert {ops.attention_params(e) for e in eqns} == {(True, head_dim**-0.5)}
    _close(program(traced.weights, TOKENS), model(TOKENS))


def test_the_program_at_other_shapes_is_rewritten_again():
    """``at_args`` (what the pipeline pass's micro-batches ask for) re-traces the source at
    the new shapes and routes its attention again; the full-batch program is untouched."""
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    program = attention(trace_module(model, TOKENS), PassContext())
    half = program.at_args((TOKENS[:1],))
    assert isinstance(half, AttentionProgram)
    assert half.report.rewrites == {"ligerjax_attention_routed": cfg.num_layers}
    assert half.jaxpr.jaxpr.invars[-1].aval.shape == (1, 6)
    assert program.jaxpr.jaxpr.invars[-1].aval.shape == (2, 6)
    _close(half(program.weights, TOKENS[1:]), model(TOKENS[1:]))
    with pytest.raises(ValueError, match="do not match the traced"):
        program.at_args((TOKENS, TOKENS))


# -- hand-written subgraphs --------------------------------------------------------------------


def test_stock_flax_mha_becomes_one_named_attention(stock_transformer):
    model, (tokens,), _ = stock_transformer
    program, report = _run(model, tokens)
    assert report.rewrites == {"softmax_qkv_matched": 1}
    assert report.fallbacks == {}
    (eqn,) = _attention_eqns(program.jaxpr)
    assert ops.attention_params(eqn) == (True, pytest.approx(8**-0.5))
    top = ir.count_primitives(program.jaxpr, recursive=False)
    assert top["exp"] == top["reduce_max"] == top["iota"] - 1 == 0  # the mask's iotas went too


def _einsum_attention(q, k, v, *, mask=None, bias=None, prescale=False, softmax=jax.nn.softmax):
    scale = 1 / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    if prescale:
        q = q * scale
    logits_bhts = jnp.einsum("bthd,bshd->bhts", q, k)
    if not prescale:
        logits_bhts = logits_bhts * scale
    if mask is not None:
        logits_bhts = jnp.where(mask, logits_bhts, -1e9)
    if bias is not None:
        logits_bhts = logits_bhts + bias
    return jnp.einsum("bhts,bshd->bthd", softmax(logits_bhts, axis=-1), v)


def _iota_causal(t, s):
    return jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]


def _manual_softmax(x, axis):
    e = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _tril(t, s):
    return jnp.tril(jnp.ones((t, s), bool))


def _causal_bias(t, s):
    return jnp.where(_iota_causal(t, s), 0.0, -jnp.inf)


@pytest.mark.parametrize(
    ("mask", "kwargs", "causal"),
    [
        (_iota_causal, {}, True),
        (_iota_causal, {"prescale": True}, True),
        (_tril, {}, True),
        (_causal_bias, {}, True),
        (_iota_causal, {"softmax": _manual_softmax}, True),
        (None, {}, False),
    ],
    ids=["where-iota", "prescaled-q", "tril", "additive-bias", "manual-softmax", "no-mask"],
)
def test_hand_written_einsum_attention_is_matched(mask, kwargs, causal):
    q, k, v = _qkv(1)

    def fn(q, k, v):
        extra = {}
        if mask is not None:
            key = "bias" if mask is _causal_bias else "mask"
            extra[key] = mask(q.shape[1], k.shape[1])
        return _einsum_attention(q, k, v, **kwargs, **extra)

    program, report = _run(fn, q, k, v)
    assert report.rewrites == {"softmax_qkv_matched": 1}
    (eqn,) = _attention_eqns(program.jaxpr)
    assert ops.attention_params(eqn) == (causal, pytest.approx(D**-0.5))
    assert ir.count_primitives(program.jaxpr, recursive=False)["exp"] == 0


def test_a_causal_mask_over_more_keys_than_queries_keeps_its_offset():
    q, k, v = _qkv(2, s=T + 3)

    def fn(q, k, v):
        mask = jnp.arange(T)[:, None] + 3 >= jnp.arange(T + 3)[None, :]
        return _einsum_attention(q, k, v, mask=mask)

    _, report = _run(fn, q, k, v)
    assert report.rewrites == {"softmax_qkv_matched": 1}


@pytest.mark.parametrize("is_causal", [True, False])
def test_jax_nn_dot_product_attention_xla_is_matched(is_causal):
    q, k, v = _qkv(3)

    def fn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")

    program, report = _run(fn, q, k, v)
    assert report.rewrites == {"softmax_qkv_matched": 1}
    (eqn,) = _attention_eqns(program.jaxpr)
    assert ops.attention_params(eqn) == (is_causal, pytest.approx(D**-0.5))


def test_attention_inside_a_jitted_function_is_rewritten_in_its_body():
    q, k, v = _qkv(4)
    inner = jax.jit(lambda q, k, v: _einsum_attention(q, k, v, mask=_iota_causal(T, T)))
    program, report = _run(lambda q, k, v: inner(q, k, v) + 1.0, q, k, v)
    assert report.rewrites == {"softmax_qkv_matched": 1}
    assert len(_attention_eqns(program.jaxpr)) == 1


# -- what is left alone ------------------------------------------------------------------------


def test_probabilities_used_outside_the_subgraph_are_not_rewritten():
    q, k, v = _qkv(5)

    def fn(q, k, v):
        p_bhts = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) * D**-0.5, axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p_bhts, v), p_bhts

    program, report = _run(fn, q, k, v)
    assert report.rewrites == {}
    assert report.fallbacks == {"softmax_qkv_intermediate_escapes": 1}
    assert program.jaxpr is program.traced.jaxpr
    assert _attention_eqns(program.jaxpr) == []


def test_an_input_dependent_mask_is_not_rewritten_and_is_counted():
    q, k, v = _qkv(6)
    lens = jnp.array([T, 3], jnp.int32)

    def fn(q, k, v, lens):
        mask_bhts = (jnp.arange(T)[None, :] < lens[:, None])[:, None, None, :]
        return _einsum_attention(q, k, v, mask=mask_bhts)

    program, report = _run(fn, q, k, v, lens)
    assert report.rewrites == {}
    assert report.fallbacks == {"softmax_qkv_mask_not_causal": 1}
    assert _attention_eqns(program.jaxpr) == []


def test_a_plain_matmul_chain_is_untouched():
    x = jax.random.normal(jax.random.key(7), (4, 8))
    program = attention(trace_module(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), x), PassContext())
    assert program.jaxpr is program.traced.jaxpr
    assert program.report.rewrites == {} and program.report.fallbacks == {}


# -- then the tensor-parallel pass -------------------------------------------------------------


@pytest.mark.multidevice
@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_after_the_pass_splits_stock_mha_by_heads(n, stock_transformer):
    model, (tokens,), rules = stock_transformer
    traced = trace_module(model, tokens)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("tp",))
    ctx = PassContext(mesh=mesh, partition_rules=rules, debug=True)
    program, (attn, tp) = PassManager([attention_pass, tensor_parallel_pass]).run(traced, ctx)
    assert attn.rewrites == {"softmax_qkv_matched": 1}
    assert tp.fallbacks == {}
    assert tp.rewrites["attention_local_heads"] == 1
    assert ir.count_primitives(program.jaxpr)["psum"] == 2
    _close(program(traced.weights, tokens), model(tokens))
