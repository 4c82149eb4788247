"""The front door: ``LLM`` (vLLM-style offline generation). The only core module that
imports ``models`` (and, for ``ligerize``, ``passes``)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import models
from ligerjax.engine.kv_cache_storage import KVCacheSpec
from ligerjax.engine.llm_engine import EngineStats, LLMEngine
from ligerjax.engine.scheduler import PreemptionMode, SchedulerConfig
from ligerjax.outputs import RequestOutput
from ligerjax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PromptLike = str | Sequence[int]

# KV memory when none is given: enough for every sequence at full length, at most this.
DEFAULT_KV_CACHE_MEMORY = 1 << 30


class LLM:
    """Generate text with a model, offline, with continuous batching over a paged KV cache.

    >>> llm = LLM(model="smollm2-135m")
    >>> params = SamplingParams(temperature=0.0, max_tokens=8)
    >>> llm.generate(["The capital of France is"], params)[0].outputs[0].text

    ``kv_cache_memory`` (bytes) sizes the device KV pages (default: room for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens, at most 1 GiB); ``swap_space``
    (bytes) sizes the host buffer that ``preemption_mode="swap"`` moves blocks to.
    ``max_num_batched_tokens`` is the token budget of one step (chunked prefill).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        seed: int = 0,
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        preemption_mode: PreemptionMode = "recompute",
        swap_space: int = 0,
    ):
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("block_size", block_size),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an int >= 1")
        if kv_cache_memory is not None and kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory={kv_cache_memory!r}: must be > 0 bytes")
        if swap_space < 0:
            raise ValueError(f"swap_space={swap_space!r}: must be >= 0 bytes")
        if preemption_mode == "swap" and swap_space == 0:
            raise ValueError("swap_space=0: preemption_mode='swap' needs host swap space")
        self.model, self.tokenizer, self.config = models.load(model, dtype=dtype)
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ValueError(
                f"max_model_len={max_model_len}: must be in [1, {limit}] for this model"
            )
        self.max_model_len = max_model_len or min(limit, 2048)
        self.max_num_seqs = max_num_seqs
        cfg = self.config
        spec = KVCacheSpec(
            cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, kv_cache_dtype or cfg.dtype
        )
        if jnp.dtype(spec.dtype) == jnp.bfloat16 and jax.default_backend() == "cpu":
            log.warning(
                "kv_cache_dtype=bfloat16 on the CPU: XLA:CPU widens the bfloat16 K/V write to "
                "float32, converting the whole cache on every layer (~4x slower steps); "
                "float16 halves the cache as well and runs at speed"
            )
        if kv_cache_memory is None:
            full = max_num_seqs * -(-self.max_model_len // block_size) * spec.bytes_per_block
            kv_cache_memory = min(DEFAULT_KV_CACHE_MEMORY, full + spec.bytes_per_block)
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=block_size,
            num_blocks=spec.num_blocks_for_budget(kv_cache_memory),
            num_host_blocks=swap_space // spec.bytes_per_block,
            preemption_mode=preemption_mode,
            enable_chunked_prefill=enable_chunked_prefill,
            enable_prefix_caching=enable_prefix_caching,
        )
        self.llm_engine = LLMEngine(
            self.model.with_rotary_table(self.max_model_len),
            cfg,
            scheduler_config,
            tokenizer=self.tokenizer,
            kv_dtype=spec.dtype,
            seed=seed,
        )
        self._request_counter = itertools.count()
        log.info(
            "LLM %s: %d KV blocks of %d tokens (%.0f MiB)",
            model,
            scheduler_config.num_blocks,
            block_size,
            scheduler_config.num_blocks * spec.bytes_per_block / 2**20,
        )

    def get_tokenizer(self) -> models.Tokenizer:
        return self.tokenizer

    def stats(self) -> EngineStats:
        """KV blocks (total, free), preemptions, prefix-cache hit rate, queues, steps."""
        return self.llm_engine.stats()

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); outputs keep the input order.

        Every prompt is checked before any runs: a bad one raises ``ValueError`` naming it.
        """
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        for i, p in enumerate(prompts):
            self.llm_engine.encode_prompt(p, name=f"prompt {i}")
        ids = self._add_requests(prompts, params)
        return self._run(ids, use_tqdm)

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

    def _add_requests(self, prompts: list[PromptLike], params: list[SamplingParams]) -> list[str]:
        """Queue every prompt, or none: a request the engine refuses aborts the others."""
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                request_id = str(next(self._request_counter))
                self.llm_engine.add_request(request_id, prompt, sp)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:
                self.llm_engine.abort_request(request_id)
            raise
        return ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        done: dict[str, RequestOutput] = {}
        engine = self.llm_engine
        with tqdm(total=len(request_ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(request_ids) and engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished and output.request_id in wanted:
                        done[output.request_id] = output
                        bar.update(1)
        return [done[i] for i in request_ids]


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (
        isinstance(prompts, Sequence)
        and len(prompts) > 0
        and isinstance(prompts[0], int | np.integer)
    )
