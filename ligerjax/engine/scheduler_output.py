"""The seam between scheduler and model runner: plain, frozen dataclasses, no ``jax.Array``.

One step: ``out = scheduler.schedule()``; the runner, in this order,

1. copies ``out.swap_out`` device blocks to their host slots,
2. performs ``out.copies`` (copy-on-write; every source is read before any destination is
   written, so the pairs may be applied as one gather/scatter or one by one in order),
3. copies ``out.swap_in`` host slots into their device blocks,
4. computes K/V of each ``ScheduledRequest.token_ids`` at positions ``num_computed_tokens``
   onwards, writing them into ``block_table`` (token at position ``p`` goes to block
   ``block_table[p // block_size]``, slot ``p % block_size``),
5. samples one token for each id in ``sample_ids`` from the logits of the request's last
   token, and returns them in a :class:`ModelRunnerOutput` keyed by those ids.

A step that swaps in never swaps out or preempts, and a block freed this step is only
handed out again to be overwritten later in that order, so the order above is all the
runner must respect. ``finished_ids`` lists the sequences that ended since the last step:
the runner drops whatever it keeps per sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ligerjax.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    """One sequence's work in a step."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens whose K/V this step computes
    num_computed_tokens: int  # position of token_ids[0]: tokens already in the cache
    block_table: tuple[int, ...]  # covers num_computed_tokens + len(token_ids) tokens
    # Sequences that get a token from the logits of token_ids[-1]: () mid-prompt, (request_id,)
    # normally, and at a fork (n > 1) all samples in index order: sample_ids[i] is index i.
    sample_ids: tuple[str, ...]
    sampling_params: SamplingParams
    prompt_token_ids: tuple[int, ...]  # for penalties (the same tuple object every step)
    output_token_ids: tuple[int, ...]  # tokens sampled so far, before this step
    index: int = 0  # this sequence's sample index within its user request

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def samples(self) -> bool:
        return bool(self.sample_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the runner needs for one step, and nothing it must decide."""

    scheduled: tuple[ScheduledRequest, ...] = ()
    swap_out: tuple[tuple[int, int], ...] = ()  # (device block, host slot)
    copies: tuple[tuple[int, int], ...] = ()  # (src device block, dst device block)
    swap_in: tuple[tuple[int, int], ...] = ()  # (host slot, device block)
    preempted_ids: tuple[str, ...] = ()  # preempted this step (recompute or swap)
    finished_ids: tuple[str, ...] = ()  # ended since the previous step

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.swap_out or self.copies or self.swap_in)


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Tokens sampled in one step, keyed by sequence id (every id of every ``sample_ids``)."""

    sampled_token_ids: Mapping[str, int]
    logprobs: Mapping[str, float] = field(default_factory=dict)  # of the sampled token
    top_logprobs: Mapping[str, dict[int, float]] = field(default_factory=dict)
