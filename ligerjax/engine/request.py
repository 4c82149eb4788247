"""One sequence the scheduler serves: its tokens, its progress and its life cycle.

A user request with ``n > 1`` (or ``best_of``) starts as a single sequence, its index 0.
When its prompt has been computed, the runner samples one token per sequence from the
prompt's last logits and the scheduler *forks*: sequences ``1 .. k-1`` are new
:class:`Request` objects (ids ``"<id>#<index>"``, ``parent_id`` = the user's id) that
share every KV block of the parent by reference count. The first time two sequences would
write into the same partially filled block, the KV cache manager copies it (copy-on-write)
and the scheduler reports the copy to the runner. Full blocks are never written again, so
they stay shared for the life of the sequences.
"""

from __future__ import annotations

import enum
import operator
import time
from collections.abc import Sequence
from typing import Any

from ligerjax.outputs import FinishReason
from ligerjax.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a sequence is in its life. ``FINISHED_*`` are terminal."""

    WAITING = "waiting"  # never scheduled yet
    RUNNING = "running"  # holds device blocks
    PREEMPTED = "preempted"  # blocks freed; recomputes from token 0 (prefix cache may help)
    SWAPPED = "swapped"  # KV lives in host slots; swapped back in before it runs again
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"  # abort_request
    FINISHED_IGNORED = "finished_ignored"  # can never fit the KV cache, even alone

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED_")

    @property
    def finish_reason(self) -> FinishReason | None:
        """The vLLM-compatible reason (``"stop"``, ``"length"``, ``"abort"``), or None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "length",
}


def _is_token_id(t: Any) -> bool:
    """An int-like (Python or numpy integer, not bool) >= 0."""
    try:
        return not isinstance(t, bool) and operator.index(t) >= 0
    except TypeError:
        return False


def fork_id(parent_id: str, index: int) -> str:
    """The id of sample ``index`` of request ``parent_id`` (index 0 keeps the user's id)."""
    return parent_id if index == 0 else f"{parent_id}#{index}"


class Request:
    """One sequence: prompt, sampled tokens, and how many of them have KV in the cache.

    ``num_computed_tokens`` counts the tokens whose K/V are in the sequence's blocks; the
    scheduler's only job is to bring it up to ``num_tokens`` (prompt + output) and sample.
    ``block_hashes`` is the hash chain over the sequence's full blocks (filled in by the KV
    cache manager). ``priority``: lower is served first under the ``"priority"`` policy.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        eos_token_id: int | None = None,
        parent_id: str | None = None,
        index: int = 0,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r}: must be a non-empty string")
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: prompt_token_ids=[] is empty")
        bad = next((t for t in prompt_token_ids if not _is_token_id(t)), None)
        if bad is not None:
            raise ValueError(f"request {request_id!r}: prompt token id {bad!r} is not an int >= 0")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"request {request_id!r}: sampling_params={sampling_params!r}")
        if not isinstance(priority, int):
            raise ValueError(f"request {request_id!r}: priority={priority!r} must be an int")
        self.request_id = request_id
        self.prompt_token_ids: tuple[int, ...] = tuple(operator.index(t) for t in prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.eos_token_id = eos_token_id
        self.parent_id = request_id if parent_id is None else parent_id
        self.index = index
        self.order = 0  # admission number, set by the scheduler: tie-break of equal arrivals
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at the first admission
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.block_hashes: list[bytes] = []
        self.stop_reason: int | str | None = None
        self.finish_detail: str | None = None  # a sentence when FINISHED_IGNORED
        self.num_preemptions = 0

    # -- derived -------------------------------------------------------------------------

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens: what ``num_computed_tokens`` catches up with."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def token_ids(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens ``[start, stop)`` of prompt + output."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return tuple(self.output_token_ids[start - p : stop - p])
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[: stop - p])

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the sampled tokens' logprobs (ranks ``best_of`` samples), if returned."""
        if len(self.output_logprobs) != len(self.output_token_ids):
            return None
        return float(sum(self.output_logprobs))

    @property
    def num_samples(self) -> int:
        """Sequences this request forks into: ``best_of`` if set, else ``n``."""
        sp = self.sampling_params
        return sp.best_of if sp.best_of is not None else sp.n

    @property
    def will_fork(self) -> bool:
        """True for the parent of ``n > 1`` until it samples its first token."""
        return self.index == 0 and self.num_samples > 1 and not self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    # -- changes -------------------------------------------------------------------------

    def append_output(
        self, token_id: int, logprob: float | None = None, top: dict[int, float] | None = None
    ) -> None:
        """Add one sampled token (its logprobs when the runner returned them)."""
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)

    def fork(self, index: int) -> Request:
        """A sibling sequence ``index`` sharing this one's prompt and progress (not its blocks:
        the KV cache manager shares those)."""
        child = Request(
            fork_id(self.parent_id, index),
            self.prompt_token_ids,
            self.sampling_params,
            arrival_time=self.arrival_time,
            priority=self.priority,
            eos_token_id=self.eos_token_id,
            parent_id=self.parent_id,
            index=index,
        )
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.output_token_ids = list(self.output_token_ids)
        return child

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
