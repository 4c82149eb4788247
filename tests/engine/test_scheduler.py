"""Scheduler: chunk splits under a token budget, preemption, swap, fork, abort, bad input."""

from __future__ import annotations

import pytest

from ligerjax.engine.request import Request, RequestStatus
from ligerjax.engine.scheduler import Scheduler, SchedulerConfig
from ligerjax.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from ligerjax.sampling_params import SamplingParams

EOS = 2
TOKEN = 7  # what the fake runner samples unless told otherwise


def make(**overrides) -> Scheduler:
    config = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "max_model_len": 64,
        "block_size": 4,
        "num_blocks": 32,
    }
    return Scheduler(SchedulerConfig(**(config | overrides)))


def req(rid: str, prompt: int | list[int], arrival: float, **params) -> Request:
    base = 1000 * sum(map(ord, rid))  # distinct prompts per id: no accidental prefix hits
    tokens = list(range(base, base + prompt)) if isinstance(prompt, int) else prompt
    priority = params.pop("priority", 0)
    params.setdefault("max_tokens", 4)
    return Request(
        rid,
        tokens,
        SamplingParams(**params),
        arrival_time=arrival,
        priority=priority,
        eos_token_id=EOS,
    )


def step(s: Scheduler, tokens: dict[str, int] | None = None):
    out = s.schedule()
    sampled = {sid: (tokens or {}).get(sid, TOKEN) for x in out.scheduled for sid in x.sample_ids}
    return out, s.update_from_output(out, ModelRunnerOutput(sampled))


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(id, position offset, new tokens, samples) per scheduled sequence."""
    return [
        (x.request_id, x.num_computed_tokens, x.num_new_tokens, x.samples) for x in out.scheduled
    ]


def assert_all_free(s: Scheduler) -> None:
    pool = s.block_pool
    assert pool.num_free_blocks == pool.num_blocks - 1
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))
    assert s.swap_space.num_free_slots == s.swap_space.num_host_blocks


# -- token budget ----------------------------------------------------------------------------


def test_chunked_prefill_splits_prompts_under_the_token_budget():
    s = make(max_num_batched_tokens=8)
    s.add_request(req("a", 20, 0.0, max_tokens=2))
    s.add_request(req("b", 5, 1.0, max_tokens=2))
    plans = [plan(step(s)[0]) for _ in range(5)]
    assert plans == [
        [("a", 0, 8, False)],
        [("a", 8, 8, False)],
        [("a", 16, 4, True), ("b", 0, 4, False)],
        [("a", 20, 1, True), ("b", 4, 1, True)],
        [("b", 5, 1, True)],
    ]
    assert not s.has_unfinished_requests()
    assert_all_free(s)


def test_a_chunk_carries_its_tokens_positions_and_blocks():
    s = make(max_num_batched_tokens=6)
    s.add_request(req("a", list(range(30, 40)), 0.0))
    first, _ = step(s)
    second, _ = step(s)
    a0, a1 = first.scheduled[0], second.scheduled[0]
    assert (a0.token_ids, a0.num_computed_tokens, a0.block_table, a0.sample_ids) == (
        (30, 31, 32, 33, 34, 35),
        0,
        (1, 2),
        (),
    )
    assert (a1.token_ids, a1.num_computed_tokens, a1.block_table, a1.sample_ids) == (
        (36, 37, 38, 39),
        6,
        (1, 2, 3),
        ("a",),
    )
    assert a1.prompt_token_ids == tuple(range(30, 40)) and a1.output_token_ids == ()
    third, _ = step(s)
    assert third.scheduled[0].token_ids == (TOKEN,)
    assert third.scheduled[0].output_token_ids == (TOKEN,)


def test_long_prefill_threshold_caps_each_prompt_per_step():
    s = make(max_num_batched_tokens=16, long_prefill_token_threshold=6)
    s.add_request(req("a", 20, 0.0))
    s.add_request(req("b", 10, 1.0))
    plans = [plan(step(s)[0]) for _ in range(4)]
    assert plans == [
        [("a", 0, 6, False), ("b", 0, 6, False)],
        [("a", 6, 6, False), ("b", 6, 4, True)],
        [("a", 12, 6, False), ("b", 10, 1, True)],
        [("a", 18, 2, True), ("b", 11, 1, True)],
    ]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_step():
    s = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    s.add_request(req("a", 10, 0.0))
    s.add_request(req("b", 10, 1.0))
    assert plan(step(s)[0]) == [("a", 0, 10, True)]
    assert plan(step(s)[0]) == [("a", 10, 1, True), ("b", 0, 10, True)]


def test_max_num_seqs_caps_a_step():
    s = make(max_num_seqs=2)
    for i, rid in enumerate("abc"):
        s.add_request(req(rid, 3, float(i), max_tokens=1))
    assert [x.request_id for x in step(s)[0].scheduled] == ["a", "b"]
    assert [x.request_id for x in step(s)[0].scheduled] == ["c"]


def test_prefix_hit_skips_computed_blocks_and_is_reported():
    s = make()
    s.add_request(req("a", list(range(10)), 0.0, max_tokens=1))
    step(s)
    s.add_request(req("b", [*range(8), 50, 51], 1.0, max_tokens=1))
    out, updated = step(s)
    assert plan(out) == [("b", 8, 2, True)]
    assert out.scheduled[0].token_ids == (50, 51)
    assert out.scheduled[0].block_table == (1, 2, 3)  # a's freed partial block is reused first
    assert updated[0].num_cached_tokens == 8
    assert s.stats.prefix_cache_hit_rate == pytest.approx(8 / 20)


# -- stop conditions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "tokens", "status", "reason", "n_out"),
    [
        ({"max_tokens": 3}, [5, 5, 5, 5], RequestStatus.FINISHED_LENGTH, None, 3),
        ({"max_tokens": 9}, [5, EOS, 5], RequestStatus.FINISHED_STOPPED, None, 2),
        ({"max_tokens": 5, "ignore_eos": True}, [EOS] * 5, RequestStatus.FINISHED_LENGTH, None, 5),
        ({"max_tokens": 9, "stop_token_ids": (8,)}, [5, 8], RequestStatus.FINISHED_STOPPED, 8, 2),
        ({"max_tokens": 9, "min_tokens": 3}, [EOS] * 3, RequestStatus.FINISHED_STOPPED, None, 3),
        ({"max_tokens": None}, [5] * 20, RequestStatus.FINISHED_LENGTH, None, 6),  # max_model_len
    ],
)
def test_every_stop_condition_ends_the_sequence_and_frees_its_blocks(
    params, tokens, status, reason, n_out
):
    s = make(max_model_len=16)
    a = req("a", 10, 0.0, **params)
    s.add_request(a)
    for token in tokens:
        _, updated = step(s, {"a": token})
        if a.is_finished:
            break
    assert updated == [a]
    assert (a.status, a.stop_reason, a.num_output_tokens) == (status, reason, n_out)
    assert a.finish_reason == ("stop" if status is RequestStatus.FINISHED_STOPPED else "length")
    assert_all_free(s)


def test_stop_string_reported_from_outside_finishes_the_sequence():
    s = make()
    s.add_request(req("a", 5, 0.0, max_tokens=10))
    s.add_request(req("b", 5, 1.0, max_tokens=10))
    step(s)
    done = s.finish_request("a", stop_reason="\n\n")
    assert (done.status, done.finish_reason, done.stop_reason) == (
        RequestStatus.FINISHED_STOPPED,
        "stop",
        "\n\n",
    )
    out, _ = step(s)
    assert out.finished_ids == ("a",)
    assert [x.request_id for x in out.scheduled] == ["b"]
    with pytest.raises(ValueError, match="'zzz'"):
        s.finish_request("zzz")


# -- preemption --------------------------------------------------------------------------------


def test_recompute_preemption_requeues_the_latest_and_the_prefix_cache_recovers_it():
    s = make(num_blocks=5)  # 4 usable blocks of 4 tokens
    a = req("a", 4, 0.0, max_tokens=5)
    b = req("b", 8, 1.0, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    out, _ = step(s)
    assert [x.block_table for x in out.scheduled] == [(1,), (2, 3)]

    out, _ = step(s)  # a takes the last block; b cannot grow and is the latest: it goes
    assert plan(out) == [("a", 4, 1, True)]
    assert out.preempted_ids == ("b",)
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert s.block_pool.free_queue() == [3, 2]  # b's cached blocks, its tail first

    for _ in range(3):  # b needs 3 blocks (2 cached + 1) but only 2 are free until a ends
        assert plan(step(s)[0])[1:] == []
    assert a.status is RequestStatus.FINISHED_LENGTH

    out, _ = step(s)  # b comes back: both its blocks are prefix hits; one token to recompute
    assert plan(out) == [("b", 8, 1, True)]
    assert out.scheduled[0].block_table == (2, 3, 4)
    assert out.scheduled[0].token_ids == (TOKEN,)
    assert b.num_cached_tokens == 0  # counted at its first admission only
    step(s)
    assert b.status is RequestStatus.FINISHED_LENGTH and b.output_token_ids == [TOKEN, TOKEN]
    assert s.stats.num_preemptions == 1
    assert_all_free(s)


def test_swap_preemption_moves_blocks_to_host_and_back():
    s = make(num_blocks=5, preemption_mode="swap", num_host_blocks=8)
    a = req("a", 4, 0.0, max_tokens=5)
    b = req("b", 8, 1.0, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    step(s)
    out, _ = step(s)
    assert out.preempted_ids == ("b",)
    assert out.swap_out == ((2, 0), (3, 1))
    assert (b.status, b.num_computed_tokens) == (RequestStatus.SWAPPED, 8)
    assert s.stats.num_swapped == 1
    for _ in range(3):
        out, _ = step(s)
        assert out.swap_in == ()
    out, _ = step(s)  # a has ended: b's two blocks come back, plus one for its next token
    assert out.swap_in == ((0, 3), (1, 2))
    assert plan(out) == [("b", 8, 1, True)]
    assert out.scheduled[0].block_table == (3, 2, 4)
    assert s.swap_space.num_free_slots == 8
    step(s)
    assert b.status is RequestStatus.FINISHED_LENGTH
    assert_all_free(s)


def test_swap_falls_back_to_recompute_when_host_space_is_full():
    s = make(num_blocks=5, preemption_mode="swap", num_host_blocks=1)
    b = req("b", 8, 1.0, max_tokens=2)
    s.add_request(req("a", 4, 0.0, max_tokens=5))
    s.add_request(b)
    step(s)
    out, _ = step(s)
    assert out.preempted_ids == ("b",) and out.swap_out == ()
    assert b.status is RequestStatus.PREEMPTED


def test_priority_policy_serves_low_values_first_and_preempts_high_values():
    s = make(num_blocks=5, policy="priority", max_num_batched_tokens=8)
    low = req("low", 8, 0.0, priority=5, max_tokens=3)
    high = req("high", 4, 1.0, priority=0, max_tokens=5)
    s.add_request(low)
    s.add_request(high)
    out, _ = step(s)
    assert plan(out) == [("high", 0, 4, True), ("low", 0, 4, False)]
    out, _ = step(s)
    assert plan(out) == [("high", 4, 1, True), ("low", 4, 4, True)]
    out, _ = step(s)  # high grows into the last free block; low then cannot and goes
    assert plan(out) == [("high", 5, 1, True)]
    assert out.preempted_ids == ("low",)


def test_fcfs_preempts_the_latest_arrival_not_the_one_asking():
    s = make(num_blocks=4, max_num_batched_tokens=16)
    early = req("early", 4, 0.0, max_tokens=6)
    late = req("late", 8, 1.0, max_tokens=6)
    s.add_request(early)
    s.add_request(late)
    step(s)  # early: block 1, late: blocks 2, 3; nothing free
    out, _ = step(s)  # early needs a block for position 4: late is preempted to free one
    assert out.preempted_ids == ("late",)
    assert plan(out) == [("early", 4, 1, True)]
    assert out.scheduled[0].block_table == (1, 3)  # late's tail block, evicted first


def test_a_sequence_that_can_never_fit_finishes_ignored_and_nothing_deadlocks():
    s = make(num_blocks=3, max_model_len=32)  # 2 usable blocks: 8 tokens
    a = req("a", 6, 0.0, max_tokens=10)
    s.add_request(a)
    for _ in range(3):
        step(s)
    out, updated = step(s)  # position 8 needs a third block and a is alone
    assert out.scheduled == () and out.finished_ids == ("a",)
    assert updated == [a]
    assert (a.status, a.finish_reason) == (RequestStatus.FINISHED_IGNORED, "length")
    assert a.finish_detail == "9 tokens need 3 KV blocks of 4; the cache has 2"
    assert_all_free(s)


# -- n > 1: fork with copy-on-write ------------------------------------------------------------


def test_fork_shares_the_prompt_and_copies_the_partial_block_once():
    s = make()
    s.add_request(req("a", 6, 0.0, n=2, max_tokens=2))
    out, updated = step(s)
    assert out.scheduled[0].sample_ids == ("a", "a#1")
    assert [(r.request_id, r.parent_id, r.index) for r in updated] == [
        ("a", "a", 0),
        ("a#1", "a", 1),
    ]
    assert [s.block_pool.ref_count(b) for b in (1, 2)] == [2, 2]
    out, updated = step(s, {"a": 11, "a#1": 12})
    assert out.copies == ((2, 3),)
    assert [(x.request_id, x.block_table, x.index) for x in out.scheduled] == [
        ("a", (1, 3), 0),
        ("a#1", (1, 2), 1),
    ]
    assert [r.output_token_ids for r in updated] == [[TOKEN, 11], [TOKEN, 12]]
    assert all(r.is_finished for r in updated)
    assert_all_free(s)


def test_best_of_forks_best_of_sequences():
    s = make()
    s.add_request(req("a", 4, 0.0, n=1, best_of=3, max_tokens=1))
    out, updated = step(s, {"a": 1, "a#1": 2, "a#2": 3})
    assert out.scheduled[0].sample_ids == ("a", "a#1", "a#2")
    assert [r.output_token_ids for r in updated] == [[1], [2], [3]]
    assert_all_free(s)


def test_abort_of_a_forked_request_ends_every_sample():
    s = make()
    s.add_request(req("a", 6, 0.0, n=3, max_tokens=5))
    step(s)
    aborted = s.abort_request("a")
    assert [r.request_id for r in aborted] == ["a", "a#1", "a#2"]
    assert all(r.finish_reason == "abort" for r in aborted)
    assert_all_free(s)
    s.add_request(req("a#1", 3, 1.0))  # the id is free again


# -- abort and bad input -----------------------------------------------------------------------


def test_abort_frees_blocks_and_the_others_keep_running():
    s = make()
    a, b = req("a", 6, 0.0, max_tokens=5), req("b", 6, 1.0, max_tokens=5)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.abort_request("a") == [a]
    assert (a.status, a.finish_reason) == (RequestStatus.FINISHED_ABORTED, "abort")
    assert s.block_pool.stats.num_used == 2
    out, updated = step(s)
    assert out.finished_ids == ("a",)
    assert plan(out) == [("b", 6, 1, True)] and updated == [b]


def test_abort_of_a_waiting_request_and_between_schedule_and_update():
    s = make(max_num_batched_tokens=4)
    a, b = req("a", 4, 0.0), req("b", 4, 1.0)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.abort_request("b")  # still waiting
    s.abort_request("a")  # scheduled, result not back yet
    assert s.update_from_output(out, ModelRunnerOutput({"a": 5})) == []
    assert a.output_token_ids == [] and not s.has_unfinished_requests()
    assert_all_free(s)


def test_abort_of_an_unknown_id_raises_naming_it():
    s = make()
    s.add_request(req("a", 3, 0.0))
    with pytest.raises(ValueError, match="unknown request id 'nope'"):
        s.abort_request("nope")
    assert plan(step(s)[0]) == [("a", 0, 3, True)]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: req("x", [], 0.0), r"prompt_token_ids=\[\] is empty"),
        (lambda: req("x", 17, 0.0), "prompt length 17 exceeds max_model_len=16"),
        (lambda: req("x", [1, -3], 0.0), "prompt token id -3"),
        (lambda: req("x", 3, 0.0, temperature=-1.0), "temperature=-1.0"),
        (lambda: req("x", 3, 0.0, top_p=0.0), "top_p=0.0"),
        (lambda: req("x", 3, 0.0, max_tokens=0), "max_tokens=0"),
        (lambda: req("x", 3, 0.0, n=9), "9 samples"),
        (lambda: req("a", 3, 0.0), "request id 'a' is already in use"),
        (lambda: Request("", [1], SamplingParams()), "request_id=''"),
    ],
)
def test_bad_input_raises_naming_the_value_and_others_keep_running(build, message):
    s = make(max_model_len=16)
    a = req("a", 5, 0.0, max_tokens=3)
    s.add_request(a)
    step(s)
    used = s.block_pool.stats.num_used
    with pytest.raises(ValueError, match=message):
        s.add_request(build())
    assert s.block_pool.stats.num_used == used and list(s.requests) == ["a"]
    step(s)
    step(s)
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert_all_free(s)


def test_a_prompt_larger_than_the_whole_cache_is_refused():
    s = make(num_blocks=3)
    with pytest.raises(ValueError, match="prompt length 9 needs 3 KV blocks; the cache has 2"):
        s.add_request(req("x", 9, 0.0))


def test_a_stale_output_is_refused():
    s = make()
    s.add_request(req("a", 3, 0.0))
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput({"a": 5}))
    with pytest.raises(ValueError, match="stale scheduler output for 'a'"):
        s.update_from_output(out, ModelRunnerOutput({"a": 5}))


def test_a_missing_sample_is_refused():
    s = make()
    s.add_request(req("a", 3, 0.0))
    with pytest.raises(ValueError, match="no token for 'a'"):
        s.update_from_output(s.schedule(), ModelRunnerOutput({}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs=0"),
        ({"num_blocks": 1}, "num_blocks=1"),
        ({"preemption_mode": "drop"}, "preemption_mode='drop'"),
        ({"policy": "lifo"}, "policy='lifo'"),
        ({"preemption_mode": "swap"}, "num_host_blocks=0"),
        (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 8},
            "max_num_batched_tokens=8",
        ),
        ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold=-1"),
    ],
)
def test_config_validation_names_the_bad_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_numpy_token_ids_are_accepted_as_ints():
    import numpy as np

    r = Request("a", np.arange(3, 7), SamplingParams())
    assert r.prompt_token_ids == (3, 4, 5, 6) and type(r.prompt_token_ids[0]) is int
    with pytest.raises(ValueError, match="prompt token id True"):
        Request("b", [1, True], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token id 1\.5"):
        Request("c", [1, 1.5], SamplingParams())


def test_logprobs_from_the_runner_are_kept_and_summed():
    s = make()
    a = req("a", 3, 0.0, max_tokens=2)
    s.add_request(a)
    for logprob in (-0.5, -1.25):
        out = s.schedule()
        s.update_from_output(out, ModelRunnerOutput({"a": 5}, {"a": logprob}, {"a": {5: logprob}}))
    assert a.output_logprobs == [-0.5, -1.25] and a.top_logprobs == [{5: -0.5}, {5: -1.25}]
    assert a.cumulative_logprob == -1.75
    assert req("b", 3, 0.0).cumulative_logprob == 0.0
    b = req("b", 3, 0.0)
    b.append_output(5)
    assert b.cumulative_logprob is None


def test_the_policy_modules_import_no_jax():
    import subprocess
    import sys

    code = (
        "import sys, ligerjax.engine.scheduler, ligerjax.engine.kv_cache_manager;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
