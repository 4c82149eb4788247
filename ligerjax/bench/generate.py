"""Single-stream decode tokens/s: ligerjax vs Hugging Face Transformers, same weights.

Both run the same checkpoint in f32 on this machine's CPU, greedy, one request, a fixed
number of new tokens (EOS ignored). Decode speed excludes the prompt: it is
``(N - 1) / (t(N tokens) - t(1 token))``, each time the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="name or checkpoint path")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--skip-transformers", action="store_true")


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _decode_rate(run: Callable[[int], object], n: int, repeats: int) -> float:
    run(n)  # compile / warm up
    t1 = _best_time(lambda: run(1), repeats)
    tn = _best_time(lambda: run(n), repeats)
    return (n - 1) / (tn - t1)


def ligerjax_rate(model: str, prompt: str, n: int, repeats: int) -> tuple[float, list[int]]:
    from ligerjax import LLM, SamplingParams

    llm = LLM(model=model)
    ids = llm.get_tokenizer().encode(prompt)

    def run(k: int):
        sp = SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)
        return llm.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids

    return _decode_rate(run, n, repeats), ids


def transformers_rate(model: str, ids: list[int], n: int, repeats: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from models.loader import resolve_checkpoint

    torch.set_num_threads(threads)
    path = resolve_checkpoint(model)
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    input_ids = torch.tensor([ids])

    def run(k: int):
        with torch.inference_mode():
            return hf.generate(
                input_ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0
            )

    return _decode_rate(run, n, repeats)


def run(args: argparse.Namespace) -> int:
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens={args.new_tokens}: need at least 2")
    ours, ids = ligerjax_rate(args.model, args.prompt, args.new_tokens, args.repeats)
    line = (
        f"bench=generate model={args.model} prompt_tokens={len(ids)} new_tokens={args.new_tokens} "
        f"ligerjax_tok_s={ours:.1f}"
    )
    if not args.skip_transformers:
        theirs = transformers_rate(args.model, ids, args.new_tokens, args.repeats, args.threads)
        line += f" transformers_tok_s={theirs:.1f} ratio={ours / theirs:.2f}"
    print(line)
    return 0
