"""Packing a model's weights for the CPU matmul: the same outputs (Llama tied and untied, a
stock ``nnx`` stack with biases), the model passed in untouched, only plain float32 linears
packed, and the runner's logits equal with and without packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from ligerjax import SamplingParams
from ligerjax.engine.model_runner import ModelRunner, ModelRunnerConfig
from ligerjax.engine.scheduler_output import ScheduledRequest
from ligerjax.engine.weight_packing import PackedEmbed, PackedLinear, pack_weights, set_live_rows
from ligerjax.kernels.native_matmul import matmul_unavailable_reason


def modules_of(model, kind) -> list:
    return [node for _, node in nnx.iter_graph(model) if type(node) is kind]


@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_llama_computes_the_same_logits(tied):
    cfg = models.LlamaConfig.preset("tiny", tie_word_embeddings=tied)
    model = models.Llama(cfg, rngs=nnx.Rngs(1))
    packed = pack_weights(model, tied_head=tied)
    linears = 7 * cfg.num_layers + (0 if tied else 1)
    assert len(modules_of(packed, PackedLinear)) == linears
    assert len(modules_of(packed, PackedEmbed)) == (1 if tied else 0)
    assert len(modules_of(model, nnx.Linear)) == linears  # the model passed in is unchanged
    assert not modules_of(model, PackedLinear)
    tokens_bt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)))
    want, _ = jax.jit(lambda m, t: m(t))(model, tokens_bt)
    got, _ = jax.jit(lambda m, t: m(t))(packed, tokens_bt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_live_rows_leave_a_packed_llamas_live_tokens_as_they_were(tied):
    """A causal model's first tokens do not see the later ones: with the rows past them marked
    as padding, their logits are unchanged and the padding rows' are 0."""
    cfg = models.LlamaConfig.preset("tiny", tie_word_embeddings=tied)
    model = models.Llama(cfg, rngs=nnx.Rngs(2))
    packed = pack_weights(model, tied_head=tied)
    tokens_bt = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 11)))

    def live_logits(m, t, n):
        set_live_rows(m, tokens=n, head=n)
        return m(t)[0]

    want, _ = jax.jit(lambda m, t: m(t))(model, tokens_bt)
    for n in (11, 7, 1):
        got = np.asarray(jax.jit(live_logits)(packed, tokens_bt, jnp.int32(n)))
        np.testing.assert_allclose(got[:, :n], np.asarray(want[:, :n]), rtol=1e-5, atol=1e-5)
        assert not np.any(got[:, n:])


class Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(12, 20, rngs=rngs), nnx.Linear(20, 7, use_bias=True, rngs=rngs)]
        )
        self.half = nnx.Linear(7, 5, dtype=jnp.bfloat16, rngs=rngs)  # computes in bf16: kept

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.half(x)


def test_a_stock_stack_packs_its_float32_linears_and_keeps_the_rest():
    model = Stack(nnx.Rngs(0))
    packed = pack_weights(model)
    assert [type(m) for m in packed.layers] == [PackedLinear, PackedLinear]
    assert type(packed.half) is nnx.Linear
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 12)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(packed(x), np.float32), np.asarray(model(x), np.float32), rtol=1e-2, atol=1e-2
    )
    inner = jnp.asarray(np.random.default_rng(2).standard_normal((3, 20)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(packed.layers[1](inner)), np.asarray(model.layers[1](inner)), atol=1e-5
    )


@pytest.mark.skipif(matmul_unavailable_reason() is not None, reason="no C++ matmul")
def test_the_runner_packs_on_the_cpu_with_the_same_logits():
    cfg = models.LlamaConfig.preset("tiny", tie_word_embeddings=True)
    model = models.Llama(cfg, rngs=nnx.Rngs(2))

    def runner(packed):
        config = ModelRunnerConfig(
            num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
            max_model_len=16, packed_weights=packed,
        )  # fmt: skip
        return ModelRunner(
            model, config, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, tied_head=True,
        )  # fmt: skip

    auto, plain = runner(None), runner(False)
    assert auto.packed_weights and not plain.packed_weights
    tokens = (3, 9, 4, 1, 7)
    step = [
        ScheduledRequest(
            request_id="a", token_ids=tokens, num_computed_tokens=0, block_table=(1, 2),
            sample_ids=("a",), sampling_params=SamplingParams(temperature=0.0),
            prompt_token_ids=tokens, output_token_ids=(),
        )
    ]  # fmt: skip
    logits = [np.asarray(r._run_step(r.build_batch(step))) for r in (auto, plain)]
    assert logits[0].shape[0] == 2  # the sequence and a padding row
    np.testing.assert_allclose(logits[0][:1], logits[1][:1], rtol=1e-5, atol=1e-5)
    assert not np.any(logits[0][1:])  # the packed head skips the padding row
