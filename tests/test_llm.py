"""The public ``LLM`` API on the real SmolLM2 model: batching, stops, seeds, bad input."""

from __future__ import annotations

import logging

import jax
import pytest

from ligerjax import LLM, RequestOutput, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Why is the sea salty?",
    "Shopping list:\n1.",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="smollm2-135m", max_num_seqs=4, max_model_len=512)


def test_batched_greedy_equals_each_prompt_alone(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    batched = llm.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out in zip(PROMPTS, batched, strict=True):
        alone = llm.generate([prompt], sp, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert isinstance(out, RequestOutput) and out.prompt == prompt
        assert out.prompt_token_ids == llm.get_tokenizer().encode(prompt)
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12
        assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids)


def test_token_id_prompts_are_accepted(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    by_ids = llm.generate(ids, sp, use_tqdm=False)[0]
    by_text = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0]
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids


def test_stop_string_ends_generation_and_is_cut_from_text(llm):
    free = llm.generate(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    text = free[0].outputs[0].text
    stop = text.strip().split()[1]  # a word that greedy decoding is known to produce
    out = llm.generate(
        PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and text.startswith(out.text)


def test_stop_token_id_and_min_tokens(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = llm.generate(PROMPTS[1], sp, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = tokens[3]
    out = llm.generate(PROMPTS[1], sp.replace(stop_token_ids=(stop_id,)), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    assert out.outputs[0].token_ids == tokens[: tokens.index(stop_id) + 1]
    suppressed = llm.generate(
        PROMPTS[1], sp.replace(stop_token_ids=(stop_id,), min_tokens=8), use_tqdm=False
    )[0]
    assert stop_id not in suppressed.outputs[0].token_ids[:8]


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=7, n=3, max_tokens=10, ignore_eos=True)
    a = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0]
    b = llm.generate([PROMPTS[2], PROMPTS[0]], sp, use_tqdm=False)[1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len(a.outputs) == 3 and len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_chat_uses_the_template_and_stops_at_eos(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=32),
        use_tqdm=False,
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason in llm.get_tokenizer().eos_token_ids


def test_logprobs_are_returned_per_token(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2)
    out = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    for token, top in zip(out.token_ids, out.logprobs, strict=True):
        assert token in top and max(top, key=top.get) == token  # greedy takes the top token
    assert out.cumulative_logprob == pytest.approx(
        sum(top[t] for t, top in zip(out.token_ids, out.logprobs, strict=True)), rel=1e-5
    )


@pytest.mark.parametrize(
    ("prompts", "params", "match"),
    [
        ([""], None, "prompt 0 is empty"),
        ([[]], None, "prompt 0 is empty"),
        ([[1, 2, 10**9]], None, "token ids"),
        (["a b " * 400], None, "max_model_len=512"),
        (["x", "y"], [SamplingParams()], "got 1 for 2 prompts"),
    ],
)
def test_bad_requests_name_the_problem(llm, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)


def test_bad_constructor_arguments_name_the_value():
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        LLM(model="smollm2-135m", max_num_seqs=0)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(model="no-such-model")


def test_kv_cache_is_sized_for_full_length_sequences_and_stats_report_it(llm):
    # 4 sequences x 512 tokens = 128 blocks of 16, plus the null block.
    llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    stats = llm.stats()
    assert stats.total_blocks == 128 and stats.block_size == 16
    assert stats.free_blocks == stats.total_blocks  # everything given back
    assert stats.num_preemptions == 0 and 0.0 <= stats.prefix_cache_hit_rate <= 1.0


def test_continuous_batching_admits_more_prompts_than_max_num_seqs(llm):
    prompts = [f"{i} + {i} =" for i in range(9)]  # 9 prompts through 4 slots
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outputs = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    assert all(o.finished and len(o.outputs[0].token_ids) == 3 for o in outputs)
    assert all(o.metrics.first_token_time <= o.metrics.finished_time for o in outputs)


def test_a_kv_budget_too_small_for_two_blocks_names_the_value():
    with pytest.raises(ValueError, match="memory_bytes=1000"):
        LLM(model="smollm2-135m", kv_cache_memory=1000)
    with pytest.raises(ValueError, match="swap_space=0"):
        LLM(model="smollm2-135m", preemption_mode="swap")


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_a_bfloat16_cache_on_the_cpu_warns_that_it_is_slow(kv_dtype, caplog):
    with caplog.at_level(logging.WARNING, logger="ligerjax.api"):
        small = LLM(model="smollm2-135m", max_num_seqs=1, max_model_len=32, kv_cache_dtype=kv_dtype)
    warned = any("kv_cache_dtype=bfloat16" in r.getMessage() for r in caplog.records)
    assert warned == (kv_dtype == "bfloat16" and jax.default_backend() == "cpu")
    out = small.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # it still serves
