"""The main job: SmolLM2-135M-Instruct answering a few prompts, then served by @ligerize.

Run with ``make demo``. Everything runs on this machine's CPU: first the continuous-batching
engine answers four chat prompts (tokens/s); then the same model goes through
``ligerize`` on three virtual CPU devices (tensor parallelism over its 9 query heads and 3
KV heads), and its parallel programs, alone and interleaved (one decode-sized primary
batch, the other conversations as the secondary batch, one XLA program), reproduce the
engine's greedy tokens.
"""

from __future__ import annotations

import os

# Three virtual CPU devices for the tensor-parallel part; JAX reads this once, at start.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=3")

import logging
import time

import jax
import numpy as np

from ligerjax import LLM, RequestOutput, SamplingParams, ligerize

TP = 3

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Name three primary colors.",
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
    # (prefill chunks, then decodes as the batch drains); the second meets the prefix
    # cache, whose hits shorten the prefill chunks into other shapes. The third is timed.
    t0 = time.perf_counter()
    for _ in range(2):
        llm.chat(conversations, params, use_tqdm=False)
    print(f"compiled and ran twice in {time.perf_counter() - t0:.1f}s")
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
    ligerized_part(llm, outputs)


def _teacher_forced(outputs: list[RequestOutput], width: int) -> tuple[np.ndarray, list]:
    """Each conversation's prompt and answer (but its last token) right-padded to ``width``,
    and where each answer's tokens sit: position t's logits predict token t + 1."""
    rows, spans = [], []
    for out in outputs:
        ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
        start = len(out.prompt_token_ids) - 1
        rows.append(ids[:-1] + [0] * (width - len(ids) + 1))
        spans.append((start, ids[start + 1 :]))
    return np.asarray(rows, np.int32), spans


def _agreement(logits: jax.Array, spans: list) -> tuple[int, int]:
    greedy = np.asarray(jax.numpy.argmax(logits, axis=-1))
    same = total = 0
    for row, (start, answer) in zip(greedy, spans, strict=True):
        picked = row[start : start + len(answer)]
        same += int(np.sum(picked == np.asarray(answer)))
        total += len(answer)
    return same, total


def ligerized_part(llm: LLM, outputs: list[RequestOutput]) -> None:
    devices = jax.devices()[:TP]
    if len(devices) < TP:
        print(f"\n(@ligerize part skipped: {len(devices)} device(s), XLA_FLAGS was set elsewhere)")
        return
    mesh = jax.sharding.Mesh(np.asarray(devices), ("tp",))
    lm = ligerize(llm.model, mesh=mesh)
    width = max(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outputs)
    width = -(-width // 16) * 16  # one compiled shape for every conversation
    tokens, spans = _teacher_forced(outputs, width)
    print(f"\n@ligerize: SmolLM2 tensor-parallel over {TP} CPU devices ({lm!r})")
    t0 = time.perf_counter()
    logits = lm(tokens)[0]
    same, total = _agreement(logits, spans)
    print(
        f"  all {len(outputs)} conversations, one parallel call ({time.perf_counter() - t0:.1f}s "
        f"incl. compile): {same}/{total} answer tokens are the engine's greedy choices"
    )
    t0 = time.perf_counter()
    primary, secondary = lm.interleaved((tokens[:1],), (tokens[1:],))
    same_p, total_p = _agreement(primary[0], spans[:1])
    same_s, total_s = _agreement(secondary[0], spans[1:])
    print(
        f"  interleaved, one XLA program ({time.perf_counter() - t0:.1f}s incl. compile): "
        f"primary {same_p}/{total_p}, secondary {same_s}/{total_s} greedy tokens reproduced"
    )
    print(
        "  (compile the interleaved step for GPUs and read its schedule back: "
        "ligerjax bench interleave)"
    )


if __name__ == "__main__":
    main()
