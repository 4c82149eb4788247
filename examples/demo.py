"""The main job: SmolLM2-135M-Instruct answering a few prompts, with tokens/s.

Run with ``make demo``. Everything runs on this machine's CPU.
"""

from __future__ import annotations

import logging
import time

from ligerjax import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three uses of a paperclip.",
    "Explain in one sentence why the sky is blue.",
]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    llm = LLM(model="smollm2-135m", max_num_seqs=4)
    print(f"loaded smollm2-135m in {time.perf_counter() - t0:.1f}s")
    params = SamplingParams(temperature=0.0, max_tokens=64)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    # The first run compiles the step programs for every shape this workload meets
    # (prefill chunks, then decodes as the batch drains); the second is timed.
    t0 = time.perf_counter()
    llm.chat(conversations, params, use_tqdm=False)
    print(f"compiled and ran once in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - t0
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    for q, out in zip(QUESTIONS, outputs, strict=True):
        completion = out.outputs[0]
        n, why = len(completion.token_ids), completion.finish_reason
        print(f"\n>>> {q}\n{completion.text.strip()}\n[{n} tokens, finish: {why}]")
    rate = new_tokens / elapsed
    print(f"\n{new_tokens} tokens in {elapsed:.2f}s: {rate:.1f} tokens/s, {len(QUESTIONS)} at once")


if __name__ == "__main__":
    main()
