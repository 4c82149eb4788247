"""Offline throughput: ligerjax continuous batching vs Transformers static batches and llama.cpp.

One fixed synthetic workload, all requests queued at t=0: ``--num-requests`` prompts of
random token ids (ids 100-40000) with prompt lengths uniform in ``[--min-prompt,
--max-prompt]`` and output lengths uniform in ``[--min-output, --max-output]`` (numpy
``default_rng(--seed)``), greedy, EOS ignored so every request produces exactly its output
length. Output tokens/s = requested output tokens / wall time. TTFT counts from t=0 (queueing
included); TPOT = (last token - first token) / (outputs - 1), per request; p50/p99 over
requests.

* ligerjax: ``LLM`` (continuous batching, paged KV, chunked prefill), f32 weights, a KV cache
  of ``--kv-cache-dtype`` (default: the model's f32), after compiling every step bucket.
* Transformers: ``generate`` on static batches of ``--hf-batch-size`` requests in arrival
  order (left padding); a batch runs until its longest request is done, so only each
  request's own tokens count. Same f32 weights (the GGUF dequantised), ``--threads`` threads.
* llama.cpp (``llama-cpp-python``, when installed): one request at a time, the GGUF's own
  Q4_1 weights, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="name or checkpoint path")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument(
        "--kv-cache-dtype", default=None, help="ligerjax's KV cache dtype (default: the model's)"
    )
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true")


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(frozen=True)
class Result:
    """Wall time and per-request latencies (seconds) of one system on the workload."""

    seconds: float
    ttft: list[float]
    tpot: list[float]

    def tok_s(self, workload: Workload) -> float:
        return workload.num_output_tokens / self.seconds

    def fields(self, prefix: str) -> str:
        p = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
        return (
            f"{prefix}ttft_p50={p(self.ttft, 50):.2f} {prefix}ttft_p99={p(self.ttft, 99):.2f} "
            f"{prefix}tpot_p50={1000 * p(self.tpot, 50):.1f}ms "
            f"{prefix}tpot_p99={1000 * p(self.tpot, 99):.1f}ms"
        )


def make_workload(args: argparse.Namespace) -> Workload:
    for lo, hi in (("min_prompt", "max_prompt"), ("min_output", "max_output")):
        if not 1 <= getattr(args, lo) <= getattr(args, hi):
            raise ValueError(f"--{lo}={getattr(args, lo)} --{hi}={getattr(args, hi)}: bad range")
    rng = np.random.default_rng(args.seed)
    prompt_lens = rng.integers(args.min_prompt, args.max_prompt + 1, size=args.num_requests)
    output_lens = rng.integers(args.min_output, args.max_output + 1, size=args.num_requests)
    prompts = [rng.integers(100, 40_000, size=int(n)).tolist() for n in prompt_lens]
    return Workload(prompts, [int(n) for n in output_lens])


def _tpot(first: float, last: float, n: int) -> float:
    return (last - first) / (n - 1) if n > 1 else 0.0


def run_ligerjax(args: argparse.Namespace, workload: Workload) -> Result:
    from ligerjax import LLM, SamplingParams

    longest = max(len(p) for p in workload.prompts) + max(workload.output_lens)
    llm = LLM(
        model=args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=longest + 1,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    llm.llm_engine.runner.warm_up()
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens
    ]
    t0 = time.monotonic()
    outputs = llm.generate(workload.prompts, params, use_tqdm=True)
    seconds = time.monotonic() - t0
    ttft, tpot = [], []
    for out, n in zip(outputs, workload.output_lens, strict=True):
        m = out.metrics
        assert m is not None and m.first_token_time is not None and m.finished_time is not None
        assert len(out.outputs[0].token_ids) == n
        ttft.append(m.first_token_time - t0)
        tpot.append(_tpot(m.first_token_time, m.finished_time, n))
    log.info("ligerjax stats: %s", llm.stats())
    return Result(seconds, ttft, tpot)


def run_transformers(args: argparse.Namespace, workload: Workload) -> Result:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from models.loader import resolve_checkpoint

    torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.model)
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()

    class Clock(BaseStreamer):
        """Records when generate hands out each step's tokens (the first put is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.monotonic())

        def end(self) -> None:
            pass

    def generate(prompts: Sequence[list[int]], new_tokens: int, clock: BaseStreamer | None):
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )

    generate(workload.prompts[:2], 2, None)  # warm up
    bs = args.hf_batch_size
    ttft, tpot = [], []
    t0 = time.monotonic()
    for start in tqdm(range(0, len(workload.prompts), bs), desc="transformers", unit="batch"):
        lens = workload.output_lens[start : start + bs]
        clock = Clock()
        generate(workload.prompts[start : start + bs], max(lens), clock)
        token_times = clock.times[1:]  # times[k] is when token k + 1 of every row came out
        for n in lens:
            ttft.append(token_times[0] - t0)
            tpot.append(_tpot(token_times[0], token_times[n - 1], n))
    return Result(time.monotonic() - t0, ttft, tpot)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def run_llama_cpp(args: argparse.Namespace, workload: Workload) -> Result:
    from llama_cpp import Llama

    from models.loader import resolve_checkpoint

    path = resolve_checkpoint(args.model)
    if path.suffix != ".gguf":
        raise ValueError(f"--model {args.model}: llama.cpp needs a .gguf checkpoint, got {path}")
    longest = max(len(p) for p in workload.prompts) + max(workload.output_lens)
    llm = Llama(
        model_path=str(path),
        n_ctx=longest + 8,
        n_threads=args.threads,
        n_batch=512,
        verbose=False,
    )

    def one(prompt: list[int], n: int) -> list[float]:
        llm.reset()
        times = []
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.monotonic())
            if len(times) == n:
                break
        return times

    one(workload.prompts[0][:8], 2)  # warm up
    ttft, tpot = [], []
    t0 = time.monotonic()
    for prompt, n in tqdm(
        list(zip(workload.prompts, workload.output_lens, strict=True)),
        desc="llama.cpp",
        unit="req",
    ):
        times = one(prompt, n)
        ttft.append(times[0] - t0)
        tpot.append(_tpot(times[0], times[-1], n))
    return Result(time.monotonic() - t0, ttft, tpot)


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host's CPU as one token of the result line: vendor, family and model, and
    ``-avx512`` where it has AVX-512 (``amd-f25m17-avx512``); the machine's name where
    ``cpuinfo`` cannot be read. The peers' ratios move with it (docs/BENCHMARKS.md)."""
    info: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.machine() or "unknown"
    parts = [{"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(info.get("vendor_id", ""), "")]
    if "cpu family" in info and "model" in info:
        parts.append(f"f{info['cpu family']}m{info['model']}")
    label = "-".join(p for p in parts if p) or platform.machine() or "unknown"
    if "avx512f" in info.get("flags", "").split():
        label += "-avx512"
    return label


def run(args: argparse.Namespace) -> int:
    workload = make_workload(args)
    ours = run_ligerjax(args, workload)
    ours_tok_s = ours.tok_s(workload)
    line = (
        f"bench=throughput model={args.model} reqs={len(workload.prompts)} "
        f"ligerjax_tok_s={ours_tok_s:.1f}"
    )
    if args.kv_cache_dtype:
        line += f" kv_cache_dtype={args.kv_cache_dtype}"
    latencies = [ours.fields("")]
    if not args.skip_transformers:
        hf = run_transformers(args, workload)
        hf_tok_s = hf.tok_s(workload)
        line += f" transformers_tok_s={hf_tok_s:.1f} ratio={ours_tok_s / hf_tok_s:.2f}"
        latencies.append(hf.fields("hf_"))
    if args.skip_llama_cpp:
        pass
    elif llama_cpp_available():
        cpp = run_llama_cpp(args, workload)
        cpp_tok_s = cpp.tok_s(workload)
        line += f" llama_cpp_tok_s={cpp_tok_s:.1f} llama_cpp_ratio={ours_tok_s / cpp_tok_s:.2f}"
        latencies.append(cpp.fields("cpp_"))
    else:
        log.warning("llama-cpp-python is not installed: skipping the llama.cpp peer")
        line += " llama_cpp_tok_s=skipped"
    mean_prompt = np.mean([len(p) for p in workload.prompts])
    line += (
        f" {' '.join(latencies)} mean_prompt={mean_prompt:.0f}"
        f" mean_output={np.mean(workload.output_lens):.0f}"
        f" output_tokens={workload.num_output_tokens} cpu={host_cpu()}"
    )
    print(line)
    return 0
