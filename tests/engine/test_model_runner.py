"""The model runner: packed step inputs, buckets, logits against a plain forward, named op."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from ligerjax import SamplingParams, ops
from ligerjax.engine import model_runner
from ligerjax.engine.model_runner import ModelRunner, ModelRunnerConfig
from ligerjax.engine.scheduler_output import ScheduledRequest, SchedulerOutput

CFG = models.LlamaConfig.preset("tiny")
MODEL = models.Llama(CFG, rngs=nnx.Rngs(0))
GREEDY = SamplingParams(temperature=0.0)


def make_runner(**overrides) -> ModelRunner:
    fields = {
        "num_blocks": 16,
        "block_size": 4,
        "max_num_seqs": 4,
        "max_num_batched_tokens": 64,
        "max_model_len": 32,
    }
    return ModelRunner(
        MODEL,
        ModelRunnerConfig(**(fields | overrides)),
        num_layers=CFG.num_layers,
        num_kv_heads=CFG.num_kv_heads,
        head_dim=CFG.head_dim,
        vocab_size=CFG.vocab_size,
    )


def scheduled(rid, tokens, computed, table, samples=True) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=rid,
        token_ids=tuple(tokens),
        num_computed_tokens=computed,
        block_table=tuple(table),
        sample_ids=(rid,) if samples else (),
        sampling_params=GREEDY,
        prompt_token_ids=tuple(tokens),
        output_token_ids=(),
    )


def test_batch_packs_tokens_slots_and_tables_padded_to_buckets():
    runner = make_runner()
    batch = runner.build_batch(
        [
            scheduled("a", [10, 11, 12], 5, [3, 7]),  # positions 5, 6, 7: block 7, slots 1..3
            scheduled("b", [20, 21], 4, [9, 2]),  # positions 4, 5: block 2, slots 0, 1
        ]
    )
    assert batch.token_ids_t.tolist() == [10, 11, 12, 20, 21] + [0] * 3  # bucket 8
    assert batch.positions_t[:5].tolist() == [5, 6, 7, 4, 5]
    assert batch.slot_mapping_t.tolist() == [29, 30, 31, 8, 9] + [16 * 4] * 3
    assert batch.block_tables_bm.shape == (4, 8)  # min(8, 4) rows; 32 / 4 blocks wide
    assert batch.block_tables_bm[:2, :2].tolist() == [[3, 7], [9, 2]]
    assert batch.cu_q_lens_b1.tolist() == [0, 3, 5, 5, 5]
    assert batch.context_lens_b.tolist() == [8, 6, 0, 0]
    assert batch.logits_index_b[:2].tolist() == [2, 4]


def test_token_buckets_and_too_many_tokens():
    cfg = ModelRunnerConfig(num_blocks=4, max_num_batched_tokens=100, max_num_seqs=48)
    assert cfg.token_buckets() == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
    seq_buckets = [1, 2, 4, 8, 16, 24, 32, 48, 64, 64, 64]  # rows: min(T, 64)
    assert [cfg.seq_bucket(t) for t in cfg.token_buckets()] == seq_buckets
    coarse = ModelRunnerConfig(num_blocks=4, max_num_batched_tokens=100, min_token_bucket=16)
    assert coarse.token_buckets() == (16, 24, 32, 48, 64, 96, 128)
    runner = make_runner(max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="17 tokens: more than max_num_batched_tokens=16"):
        runner.build_batch([scheduled("a", range(17), 0, [1, 2, 3, 4, 5])])


@pytest.mark.parametrize(("field", "value"), [("num_blocks", 1), ("block_size", 0)])
def test_config_names_bad_values(field, value):
    with pytest.raises(ValueError, match=f"ModelRunnerConfig.{field}={value}"):
        ModelRunnerConfig(**({"num_blocks": 8} | {field: value}))


def test_chunked_prefill_then_decode_logits_match_a_full_forward():
    runner = make_runner()
    tokens = [5, 17, 3, 99, 42, 7, 250, 1, 8]
    table = [4, 9, 1]
    # Two prefill chunks (5 + 3 tokens), then one decode token, next to another sequence.
    chunks = [(0, 5), (5, 8), (8, 9)]
    got = []
    for start, stop in chunks:
        other = scheduled("x", [1, 2], 0, [12])
        batch = runner.build_batch([other, scheduled("s", tokens[start:stop], start, table)])
        got.append(np.asarray(runner._run_step(batch))[1])
    full, _ = MODEL(jnp.asarray([tokens]))
    want = np.asarray(full[0])[[4, 7, 8]]
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-4)


def test_execute_samples_greedy_tokens_and_logprobs():
    runner = make_runner()
    tokens = [5, 17, 3, 99]
    out = runner.execute(SchedulerOutput(scheduled=(scheduled("s", tokens, 0, [2]),)))
    full, _ = MODEL(jnp.asarray([tokens]))
    logprobs = jax.nn.log_softmax(full[0, -1])
    assert out.sampled_token_ids == {"s": int(jnp.argmax(full[0, -1]))}
    assert out.logprobs["s"] == pytest.approx(float(logprobs.max()), abs=1e-4)
    assert out.top_logprobs == {}
    mid_prompt = runner.execute(
        SchedulerOutput(scheduled=(scheduled("t", tokens, 0, [3], samples=False),))
    )
    assert mid_prompt.sampled_token_ids == {}


def test_step_attends_through_the_named_paged_attention_op():
    runner = make_runner()
    batch = runner.build_batch([scheduled("a", [1, 2, 3], 0, [1])])
    jaxpr = jax.make_jaxpr(
        lambda w, kv, b: model_runner._step(w, kv, b, structure=runner._structure)
    )(runner.weights, runner.kv_pages, batch)
    names = [str(e.params.get("name")) for e in _all_eqns(jaxpr.jaxpr)]
    assert names.count(ops.RAGGED_PAGED_ATTENTION_NAME) == CFG.num_layers


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        if "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            yield from _all_eqns(getattr(inner, "jaxpr", inner))
