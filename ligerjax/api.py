"""The front door: ``LLM`` (vLLM-style offline generation). The only core module that
imports ``models`` (and, for ``ligerize``, ``passes``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import models
from ligerjax.engine.detokenizer import IncrementalDetokenizer
from ligerjax.engine.sampler import SamplingRow
from ligerjax.engine.static_runner import StaticBatchRunner
from ligerjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ligerjax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PromptLike = str | Sequence[int]


@dataclass
class _Sequence:
    """Host-side state of one sampled sequence (one of a request's ``n``)."""

    request_index: int
    index: int
    row: SamplingRow
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class LLM:
    """Generate text with a model, offline, in batches.

    >>> llm = LLM(model="smollm2-135m")
    >>> params = SamplingParams(temperature=0.0, max_tokens=8)
    >>> llm.generate(["The capital of France is"], params)[0].outputs[0].text
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_num_seqs: int = 16,
        seed: int = 0,
    ):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs}: must be >= 1")
        self.model, self.tokenizer, self.config = models.load(model, dtype=dtype)
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ValueError(
                f"max_model_len={max_model_len}: must be in [1, {limit}] for this model"
            )
        self.max_model_len = max_model_len or min(limit, 2048)
        self.max_num_seqs = max_num_seqs
        self._rng = np.random.default_rng(seed)
        cfg = self.config
        self._runner = StaticBatchRunner(
            self.model,
            lambda b, s: models.DenseKVCache.zeros(
                cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
            ),
            max_model_len=self.max_model_len,
            vocab_size=cfg.vocab_size,
        )

    def get_tokenizer(self) -> models.Tokenizer:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); outputs keep the input order."""
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        requests = [
            self._make_request(i, p, sp)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        seqs = [s for _, _, seq_list in requests for s in seq_list]
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm)
        for start in range(0, len(seqs), self.max_num_seqs):
            self._run_batch(seqs[start : start + self.max_num_seqs])
            done = {s.request_index for s in seqs[: start + self.max_num_seqs]}
            bar.update(len(done) - bar.n)
        bar.close()
        return [self._request_output(*r) for r in requests]

    def chat(
        self,
        messages: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # -- requests ---------------------------------------------------------------------

    def _params_per_prompt(self, sp, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"sampling_params: got {len(sp)} for {n} prompts")
        return sp

    def _make_request(self, index: int, prompt: PromptLike, sp: SamplingParams):
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty: {prompt!r}")
        if bad := [t for t in ids if not 0 <= t < self.config.vocab_size]:
            raise ValueError(
                f"prompt {index}: token ids {bad[:5]} outside [0, {self.config.vocab_size})"
            )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens: no room left under "
                f"max_model_len={self.max_model_len}"
            )
        stop_ids = () if sp.ignore_eos else self.tokenizer.eos_token_ids
        suppress = tuple(sorted(set(stop_ids) | set(sp.stop_token_ids)))
        base_seed = sp.seed if sp.seed is not None else int(self._rng.integers(2**31))

        def decode(token_ids: Sequence[int]) -> str:
            return self.tokenizer.decode(token_ids, skip_special_tokens=sp.skip_special_tokens)

        seqs = [
            _Sequence(
                index,
                j,
                SamplingRow(sp, base_seed + j, ids, (), suppress),
                IncrementalDetokenizer(decode, sp.stop, sp.include_stop_str_in_output),
            )
            for j in range(sp.n)
        ]
        metrics = RequestMetrics(arrival_time=time.monotonic())
        return (text, ids, metrics), sp, seqs

    def _run_batch(self, seqs: list[_Sequence]) -> None:
        def is_finished(i: int, token: int) -> bool:
            return self._append_token(seqs[i], token)

        for step in self._runner.run([s.row for s in seqs], is_finished):
            for i in step.token_ids:
                seqs[i].cumulative_logprob += step.logprobs[i]
                if seqs[i].row.params.logprobs is not None:
                    seqs[i].logprobs.append(step.top_logprobs[i])
        for s in seqs:
            s.detok.flush()
            if s.finish_reason is None:  # the cache filled up
                s.finish_reason = "length"

    def _append_token(self, seq: _Sequence, token: int) -> bool:
        sp = seq.row.params
        seq.token_ids.append(token)
        seq.detok.add_tokens([token])
        n = len(seq.token_ids)
        if n >= sp.min_tokens:
            if token in sp.stop_token_ids or (
                not sp.ignore_eos and token in self.tokenizer.eos_token_ids
            ):
                seq.finish_reason, seq.stop_reason = "stop", token
            elif seq.detok.stop_reason is not None:
                seq.finish_reason, seq.stop_reason = "stop", seq.detok.stop_reason
        if seq.finish_reason is None and sp.max_tokens is not None and n >= sp.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is None and len(seq.row.prompt_ids) + n >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _request_output(self, head, sp: SamplingParams, seqs: list[_Sequence]) -> RequestOutput:
        (text, ids, metrics) = head
        metrics.finished_time = time.monotonic()
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.detok.text,
                token_ids=s.token_ids,
                cumulative_logprob=s.cumulative_logprob,
                logprobs=s.logprobs if sp.logprobs is not None else None,
                finish_reason=s.finish_reason,  # type: ignore[arg-type]
                stop_reason=s.stop_reason,
            )
            for s in seqs
        ]
        return RequestOutput(
            request_id=str(seqs[0].request_index),
            prompt=text,
            prompt_token_ids=list(ids),
            outputs=outputs,
            finished=True,
            metrics=metrics,
        )


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (
        isinstance(prompts, Sequence)
        and len(prompts) > 0
        and isinstance(prompts[0], int | np.integer)
    )
