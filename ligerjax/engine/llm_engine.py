"""The engine loop: scheduler + model runner + detokenizer, one ``step()`` at a time.

``add_request`` validates and queues a user request; every ``step()`` schedules, runs the
model once, applies the sampled tokens, detokenizes them (a stop string ends a sequence
through ``Scheduler.finish_request``) and returns a :class:`~ligerjax.RequestOutput` for
each user request that changed. A request with ``n > 1`` (or ``best_of``) runs as the
scheduler's sequences ``"<id>"``, ``"<id>#1"``, ...; the engine groups them back by
``parent_id``, and with ``best_of > n`` returns the ``n`` samples of highest cumulative
log-probability once all have finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flax import nnx

from ligerjax.engine.detokenizer import IncrementalDetokenizer
from ligerjax.engine.model_runner import ModelRunner, ModelRunnerConfig
from ligerjax.engine.request import Request, RequestStatus, fork_id
from ligerjax.engine.scheduler import Scheduler, SchedulerConfig
from ligerjax.engine.scheduler_output import ModelRunnerOutput
from ligerjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ligerjax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PromptLike = str | Sequence[int]


class TokenizerLike(Protocol):
    """What the engine needs of a tokenizer (``models.Tokenizer`` has it)."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class ModelShape(Protocol):
    """What the engine needs of a model's configuration (``models.LlamaConfig`` has it)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    eos_token_ids: tuple[int, ...]
    tie_word_embeddings: bool  # the LM head is the embedding's ``attend``


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine: KV blocks, queues, preemptions, prefix-cache hits."""

    total_blocks: int  # usable device KV blocks (the null block excluded)
    free_blocks: int  # blocks free now (cached free blocks included: evictable)
    block_size: int
    num_running: int
    num_waiting: int
    num_swapped: int
    num_preemptions: int
    prefix_cache_hit_rate: float  # hit tokens / looked-up tokens at admission
    kv_usage: float
    num_steps: int
    num_compiled_steps: int


@dataclass
class _Sequence:
    """Engine-side state of one scheduler sequence: its request and its detokenizer."""

    request: Request
    detok: IncrementalDetokenizer | None
    num_detokenized: int = 0


@dataclass
class _Group:
    """A user request: its prompt, parameters, metrics and sequences by sample index."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sequences: dict[int, _Sequence] = field(default_factory=dict)
    finished: bool = False


class LLMEngine:
    """Continuous-batching generation on one model: requests in, ``RequestOutput``s out.

    ``model`` is a causal LM with ``hidden_states`` and ``logits`` (``models.Llama``);
    ``model_config`` gives its KV shape and vocabulary; ``tokenizer`` (optional) turns
    text prompts into ids and ids into text (without one, prompts are token ids and
    outputs have empty text). ``seed`` draws the seeds of requests that give none.
    """

    def __init__(
        self,
        model: nnx.Module,
        model_config: ModelShape,
        scheduler_config: SchedulerConfig,
        *,
        tokenizer: TokenizerLike | None = None,
        kv_dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        self.config = scheduler_config
        self.model_config = model_config
        self.tokenizer = tokenizer
        eos = tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()
        self.eos_token_ids = eos or tuple(model_config.eos_token_ids)
        self.scheduler = Scheduler(scheduler_config)
        self.runner = ModelRunner(
            model,
            ModelRunnerConfig(
                num_blocks=scheduler_config.num_blocks,
                block_size=scheduler_config.block_size,
                max_num_seqs=scheduler_config.max_num_seqs,
                max_num_batched_tokens=scheduler_config.max_num_batched_tokens,
                max_model_len=scheduler_config.max_model_len,
                num_host_blocks=scheduler_config.num_host_blocks,
                kv_dtype=kv_dtype,
            ),
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            vocab_size=model_config.vocab_size,
            dtype=model_config.dtype,
            eos_token_ids=self.eos_token_ids,
            tied_head=model_config.tie_word_embeddings,
        )
        self._rng = np.random.default_rng(seed)
        self._groups: dict[str, _Group] = {}

    # -- requests in and out -----------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: PromptLike,
        sampling_params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request. Raises ``ValueError`` naming the bad value (and
        queues nothing): an id in use, an empty prompt, token ids outside the vocabulary, a
        prompt leaving no room under ``max_model_len``, bad sampling parameters."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r}: must be a non-empty string")
        if request_id in self._groups:
            raise ValueError(f"add_request: request id {request_id!r} is already in use")
        ids = self.encode_prompt(prompt, name=f"request {request_id!r}")
        params = self._checked_params(sampling_params, request_id)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        request = Request(
            request_id,
            ids,
            params,
            arrival_time=arrival,
            priority=priority,
            eos_token_id=self.eos_token_ids[0] if self.eos_token_ids else None,
        )
        self.scheduler.add_request(request)
        self._groups[request_id] = _Group(
            request_id,
            prompt if isinstance(prompt, str) else None,
            list(ids),
            params,
            RequestMetrics(arrival_time=arrival),
        )

    def encode_prompt(self, prompt: PromptLike, *, name: str = "prompt") -> list[int]:
        """Token ids of a prompt (text or ids), checked: non-empty, in the vocabulary, and
        leaving room for at least one new token under ``max_model_len``."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{name}: a text prompt needs a tokenizer; pass token ids")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"{name} is empty: {prompt!r}")
        vocab = self.model_config.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ValueError(f"{name}: token ids {bad[:5]} outside [0, {vocab})")
        limit = self.config.max_model_len
        if len(ids) >= limit:
            raise ValueError(
                f"{name} has {len(ids)} tokens: no room left under max_model_len={limit}"
            )
        return ids

    def abort_request(self, request_id: str) -> None:
        """Abort a request (all its samples). ``ValueError`` naming the id if none is live."""
        if request_id not in self._groups:
            raise ValueError(f"abort_request: unknown request id {request_id!r}")
        self.scheduler.abort_request(request_id)
        del self._groups[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def live_request_ids(self) -> list[str]:
        """Ids of the user requests not finished yet, in arrival order."""
        return list(self._groups)

    def stats(self) -> EngineStats:
        s = self.scheduler.stats
        pool = self.scheduler.block_pool
        return EngineStats(
            total_blocks=pool.num_usable_blocks,
            free_blocks=pool.num_free_blocks,
            block_size=self.config.block_size,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_swapped=s.num_swapped,
            num_preemptions=s.num_preemptions,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            kv_usage=s.kv_usage,
            num_steps=self.runner.num_steps,
            num_compiled_steps=self.runner.num_compiled_steps(),
        )

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every user request that changed.

        Invariant: each live user request has a group here and at least one live sequence
        in the scheduler; a group leaves once its last sequence has finished.
        """
        out = self.scheduler.schedule()
        now = time.monotonic()
        for s in out.scheduled:
            group = self._group_of(s.request_id)
            if group is not None and group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
        runner_output = self.runner.execute(out) if not out.is_empty else ModelRunnerOutput({})
        updated = self.scheduler.update_from_output(out, runner_output)
        now = time.monotonic()
        changed: dict[str, _Group] = {}
        for request in updated:
            group = self._groups.get(request.parent_id)
            if group is None:
                continue
            self._absorb(group, request, now)
            changed[group.request_id] = group
        outputs = []
        for group in changed.values():
            group.finished = self._group_finished(group)
            if group.finished:
                group.metrics.finished_time = now
                del self._groups[group.request_id]
            output = self._request_output(group)
            if output is not None:
                outputs.append(output)
        return outputs

    def _group_of(self, sequence_id: str) -> _Group | None:
        request = self.scheduler.requests.get(sequence_id)
        return self._groups.get(request.parent_id) if request is not None else None

    def _absorb(self, group: _Group, request: Request, now: float) -> None:
        """Take a sequence's new tokens: metrics, detokenization, stop strings."""
        seq = group.sequences.get(request.index)
        if seq is None:
            seq = group.sequences[request.index] = _Sequence(request, self._detokenizer(group))
        seq.request = request
        if request.output_token_ids and group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        new = request.output_token_ids[seq.num_detokenized :]
        seq.num_detokenized = len(request.output_token_ids)
        if seq.detok is None:
            return
        if new:
            seq.detok.add_tokens(new)
        stop = seq.detok.stop_reason
        if stop is not None and request.num_output_tokens >= group.params.min_tokens:
            if request.is_finished:  # ended by length in the same step: the string wins
                request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop
            else:
                self.scheduler.finish_request(
                    request.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop
                )
        if request.is_finished:
            seq.detok.flush()

    def _detokenizer(self, group: _Group) -> IncrementalDetokenizer | None:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return None
        sp = group.params

        def decode(ids: Sequence[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)

        return IncrementalDetokenizer(decode, sp.stop, sp.include_stop_str_in_output)

    def _group_finished(self, group: _Group) -> bool:
        live = self.scheduler.requests
        n = group.params.best_of or group.params.n
        return not any(fork_id(group.request_id, i) in live for i in range(n))

    # -- outputs -----------------------------------------------------------------------------

    def _request_output(self, group: _Group) -> RequestOutput | None:
        sp = group.params
        seqs = [group.sequences[i] for i in sorted(group.sequences)]
        best_of = sp.best_of is not None and sp.best_of > sp.n
        if best_of:
            if not group.finished:
                return None  # best_of > n: only the final ranking is returned
            seqs = sorted(seqs, key=_rank_key)[: sp.n]
        completions = [
            self._completion(i if best_of else seq.request.index, seq, sp)
            for i, seq in enumerate(seqs)
        ]
        parent = group.sequences.get(0)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=group.finished,
            num_cached_tokens=parent.request.num_cached_tokens if parent is not None else 0,
            metrics=group.metrics,
        )

    @staticmethod
    def _completion(index: int, seq: _Sequence, sp: SamplingParams) -> CompletionOutput:
        request = seq.request
        finished = request.is_finished
        text = ""
        if seq.detok is not None:
            text = seq.detok.text if finished else seq.detok.text[: seq.detok.emitted]
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob,
            logprobs=list(request.top_logprobs) if sp.logprobs is not None else None,
            finish_reason=request.finish_reason if finished else None,
            stop_reason=_stop_reason(request) if finished else None,
        )

    def _checked_params(self, sp: Any, request_id: str) -> SamplingParams:
        if sp is None:
            sp = SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise ValueError(
                f"request {request_id!r}: sampling_params={sp!r} is not a SamplingParams"
            )
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop={sp.stop!r} needs a tokenizer")
        seed = sp.seed if sp.seed is not None else int(self._rng.integers(2**31))
        extra_eos = () if sp.ignore_eos else self.eos_token_ids[1:]  # the first is the EOS
        stop_ids = sp.stop_token_ids + tuple(t for t in extra_eos if t not in sp.stop_token_ids)
        return sp.replace(seed=seed, stop_token_ids=stop_ids)  # replace() validates again


def _rank_key(seq: _Sequence) -> float:
    logprob = seq.request.cumulative_logprob
    return -logprob if logprob is not None else float("inf")


def _stop_reason(request: Request) -> int | str | None:
    """The stop string or token that ended a sequence (the EOS token id for EOS)."""
    if request.stop_reason is None and request.status is RequestStatus.FINISHED_STOPPED:
        return request.output_token_ids[-1] if request.output_token_ids else None
    return request.stop_reason
