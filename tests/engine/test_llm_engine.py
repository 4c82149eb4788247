"""LLMEngine end to end on the real SmolLM2: prefix caching, metrics, stats, abort, best_of,
and bad input that names the value while other requests keep running."""

from __future__ import annotations

import pytest

from ligerjax import LLM, SamplingParams
from ligerjax.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
LONG_PROMPT = (
    "You are a careful assistant. Answer briefly and cite the facts you rely on. "
    "The lighthouse keeper walked along the shore every morning, collecting driftwood, "
    "shells and the occasional bottle. One day a bottle held a letter that began:"
)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="smollm2-135m", max_num_seqs=8, max_model_len=256)


def run_all(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
    return done


def test_a_repeated_prompt_hits_the_prefix_cache(llm):
    first = llm.generate(LONG_PROMPT, GREEDY, use_tqdm=False)[0]
    second = llm.generate(LONG_PROMPT, GREEDY, use_tqdm=False)[0]
    n = len(first.prompt_token_ids)
    assert n > 32 and first.num_cached_tokens == 0
    assert second.num_cached_tokens == (n - 1) // 16 * 16  # full blocks, never the last token
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    stats = llm.stats()
    assert stats.prefix_cache_hit_rate > 0
    assert stats.free_blocks == stats.total_blocks and stats.num_preemptions == 0


def test_metrics_follow_the_request_life(llm):
    out = llm.generate("Count: one, two,", GREEDY, use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.ttft == pytest.approx(m.first_token_time - m.arrival_time)


def test_abort_of_an_unknown_id_raises_and_the_others_run_on(llm):
    engine = llm.llm_engine
    prompts = {"keep-1": "The quick brown fox", "drop": "Once upon a time", "keep-2": "def f(x):"}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY)
    engine.step()
    with pytest.raises(ValueError, match="unknown request id 'no-such-id'"):
        engine.abort_request("no-such-id")
    engine.abort_request("drop")
    done = run_all(engine)
    assert sorted(done) == ["keep-1", "keep-2"]
    for rid in done:
        alone = llm.generate(prompts[rid], GREEDY, use_tqdm=False)[0]
        assert done[rid].outputs[0].token_ids == alone.outputs[0].token_ids


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", GREEDY, "is empty"),
        ("word " * 300, GREEDY, "max_model_len=256"),
        ([5, 49152], GREEDY, "49152"),
        ("hi", "greedy", "sampling_params='greedy'"),
        ("hi", SamplingParams(n=9), "exceed max_num_seqs=8"),
    ],
)
def test_bad_requests_name_the_value_and_others_keep_running(llm, prompt, params, match):
    engine = llm.llm_engine
    engine.add_request("good", "Hello there", GREEDY)
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    done = run_all(engine)
    assert list(done) == ["good"] and len(done["good"].outputs[0].token_ids) == 6


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"n": 0}, "n=0"),
    ],
)
def test_invalid_sampling_values_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**fields)


def test_best_of_returns_the_n_most_likely_samples(llm):
    sp = SamplingParams(n=2, best_of=4, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)
    out = llm.generate("My favourite colour is", sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    logprobs = [c.cumulative_logprob for c in out.outputs]
    assert logprobs == sorted(logprobs, reverse=True)
    every = llm.generate("My favourite colour is", sp.replace(n=4, best_of=None), use_tqdm=False)[0]
    ranked = sorted((c.cumulative_logprob for c in every.outputs), reverse=True)
    assert logprobs == pytest.approx(ranked[:2])


def test_streamed_outputs_of_the_engine_grow_and_finish(llm):
    engine = llm.llm_engine
    engine.add_request("stream", "The weather today is", GREEDY)
    seen = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.append((len(output.outputs[0].token_ids), output.finished))
    assert seen == [(i, i == 6) for i in range(1, 7)]
