"""Steady-state decode compiles nothing: the step's shapes come from a few token buckets; and
after `warm_up`, neither does a whole greedy workload (prefills, decodes, finishing requests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from flax import nnx

import models
from ligerjax import SamplingParams
from ligerjax.engine.llm_engine import LLMEngine
from ligerjax.engine.scheduler import SchedulerConfig

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles() -> Iterator[list[float]]:
    """Collect the duration of every XLA backend compile while the block runs."""
    durations: list[float] = []

    def listener(event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            durations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield durations
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def tiny_engine(num_blocks: int) -> LLMEngine:
    """The tiny Llama: up to 8 sequences, 64-token steps, 4-token blocks."""
    cfg = models.LlamaConfig.preset("tiny")
    scheduler = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=128,
        block_size=4,
        num_blocks=num_blocks,
    )
    return LLMEngine(models.Llama(cfg, rngs=nnx.Rngs(0)), cfg, scheduler)


def test_decode_steps_after_warm_up_compile_nothing():
    engine = tiny_engine(num_blocks=96)
    sp = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", [1 + i, 2, 3, 4, 5, 6, 7], sp)
    for _ in range(3):  # prefill, then the first decode steps: these compile
        engine.step()
    compiled = engine.runner.num_compiled_steps()
    with count_compiles() as compiles:
        # Contexts grow from 9 to 50 tokens: across many blocks and key chunks.
        for _ in range(40):
            outputs = engine.step()
            assert len(outputs) == 4 and not any(o.finished for o in outputs)
    assert compiles == []
    assert engine.runner.num_compiled_steps() == compiled


def test_count_compiles_sees_a_compilation():
    with count_compiles() as compiles:
        jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(7.0)).block_until_ready()
    assert len(compiles) >= 1


def test_a_greedy_workload_after_warm_up_compiles_nothing():
    """Prefill chunks of several lengths, decodes, requests finishing at different steps:
    every shape was compiled by ``warm_up``, the sampled rows' logits included."""
    engine = tiny_engine(num_blocks=160)
    engine.runner.warm_up()
    with count_compiles() as compiles:
        for i, (prompt_len, max_tokens) in enumerate(
            [(3, 20), (50, 5), (17, 12), (90, 3), (1, 30), (33, 8), (64, 2), (9, 15), (5, 1)]
        ):
            prompt = [1 + (i * 7 + j) % 50 for j in range(prompt_len)]
            sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(f"r{i}", prompt, sp)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    assert steps > 10
    assert compiles == []
