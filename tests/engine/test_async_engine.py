"""Streaming: outputs grow token by token, end finished, and consumers do not disturb others."""

from __future__ import annotations

import asyncio

import pytest
from flax import nnx

import models
from ligerjax import SamplingParams
from ligerjax.engine.async_llm_engine import AsyncLLMEngine
from ligerjax.engine.llm_engine import LLMEngine
from ligerjax.engine.scheduler import SchedulerConfig

CFG = models.LlamaConfig.preset("tiny")
MODEL = models.Llama(CFG, rngs=nnx.Rngs(0))
PROMPTS = {"a": [1, 2, 3, 4, 5], "b": [9, 8, 7], "c": [100, 101, 102, 103, 104, 105, 106]}


def make_engine() -> AsyncLLMEngine:
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, block_size=4, num_blocks=48
    )
    return AsyncLLMEngine(LLMEngine(MODEL, CFG, config))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


async def collect(engine: AsyncLLMEngine, rid: str, n: int, stop_after: int | None = None):
    outputs = []
    async for output in engine.generate(PROMPTS[rid], greedy(n), rid):
        outputs.append(output)
        if stop_after is not None and len(outputs) == stop_after:
            break
    return outputs


def test_streams_grow_one_token_at_a_time_and_end_finished():
    async def main():
        engine = make_engine()
        streams = await asyncio.gather(collect(engine, "a", 6), collect(engine, "b", 3))
        await engine.shutdown()
        return streams

    for outputs, n in zip(asyncio.run(main()), (6, 3), strict=True):
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == list(range(1, n + 1))
        assert [o.finished for o in outputs] == [False] * (n - 1) + [True]
        final = outputs[-1].outputs[0]
        assert final.finish_reason == "length"
        assert all(
            o.outputs[0].token_ids == final.token_ids[: i + 1] for i, o in enumerate(outputs)
        )


def test_streamed_tokens_equal_the_synchronous_engine():
    async def main():
        engine = make_engine()
        outputs = await collect(engine, "c", 5)
        await engine.shutdown()
        return outputs[-1].outputs[0].token_ids

    sync = make_engine().engine
    sync.add_request("c", PROMPTS["c"], greedy(5))
    final = None
    while sync.has_unfinished_requests():
        final = sync.step()[0]
    assert asyncio.run(main()) == final.outputs[0].token_ids


def test_a_consumer_that_stops_aborts_its_request_and_others_finish():
    async def main():
        engine = make_engine()
        short, full = await asyncio.gather(
            collect(engine, "a", 20, stop_after=2), collect(engine, "b", 8)
        )
        await asyncio.sleep(0)
        stats = await engine.stats()
        live = engine.engine.live_request_ids()
        await engine.shutdown()
        return short, full, stats, live

    short, full, stats, live = asyncio.run(main())
    assert len(short) == 2 and not short[-1].finished
    assert full[-1].finished and len(full[-1].outputs[0].token_ids) == 8
    assert live == [] and stats.free_blocks == stats.total_blocks


def test_a_cancelled_consumer_aborts_its_request():
    async def main():
        engine = make_engine()
        task = asyncio.create_task(collect(engine, "a", 40))
        while not engine.engine.live_request_ids():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other = await collect(engine, "b", 3)
        live = engine.engine.live_request_ids()
        await engine.shutdown()
        return other, live

    other, live = asyncio.run(main())
    assert other[-1].finished and live == []


def test_bad_requests_raise_in_their_caller_only():
    async def bad(prompt, sp):
        async for _ in engine.generate(prompt, sp, "bad"):
            pass

    async def main():
        results = await asyncio.gather(
            collect(engine, "a", 4),
            bad([], greedy(3)),
            bad([1, 2, 10**6], greedy(3)),
            bad(list(range(64)), greedy(3)),
            return_exceptions=True,
        )
        await engine.shutdown()
        return results

    engine = make_engine()
    good, *errors = asyncio.run(main())
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 4
    assert all(isinstance(e, ValueError) for e in errors)
    assert "is empty" in str(errors[0]) and "1000000" in str(errors[1])
    assert "max_model_len=64" in str(errors[2])


def test_abort_ends_the_stream_and_unknown_ids_raise():
    async def main():
        engine = make_engine()
        task = asyncio.create_task(collect(engine, "a", 40))
        while not engine.engine.live_request_ids():
            await asyncio.sleep(0.01)
        await engine.abort("a")
        outputs = await task
        with pytest.raises(ValueError, match="unknown request id 'nope'"):
            await engine.abort("nope")
        await engine.shutdown()
        return outputs

    outputs = asyncio.run(main())
    assert not outputs or not outputs[-1].finished
