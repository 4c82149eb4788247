"""Continuous batching: per-iteration token budget, FCFS or priorities, preemption, abort.

There are no prefill and decode phases. Each sequence has ``num_computed_tokens`` and wants
``num_tokens - num_computed_tokens`` more; a step hands out a token budget, so a long prompt
is computed in chunks over several steps (chunked prefill) while decodes take one token.

A step: running sequences first, in policy order (FCFS: arrival; priority: lower value,
then arrival). When a running sequence cannot get a block, the lowest-ranked running
sequence is preempted (possibly itself): by recompute (blocks freed, back to waiting with
nothing computed; the prefix cache may give most of them back) or by swap (blocks copied to
host slots, swapped back in later). A step that preempted admits nobody. Otherwise the
pending queue (waiting, preempted and swapped sequences in policy order) is admitted in
order until the first one that does not fit: no request overtakes an earlier one.

Nothing deadlocks: only running sequences hold device blocks, and one that cannot grow
while it is the only one running can never fit; it finishes with ``FINISHED_IGNORED``.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from dataclasses import dataclass, field
from typing import Literal

from ligerjax.engine.block_pool import BlockPool
from ligerjax.engine.kv_cache_manager import KVCacheManager, cdiv
from ligerjax.engine.request import Request, RequestStatus, fork_id
from ligerjax.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from ligerjax.engine.stop_checker import check_stop
from ligerjax.engine.swap_space import SwapSpace

log = logging.getLogger(__name__)

PreemptionMode = Literal["recompute", "swap"]
Policy = Literal["fcfs", "priority"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine. ``long_prefill_token_threshold`` (0: off) caps the tokens a
    prompt gets per step, so one long prompt cannot take a whole step's budget."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    block_size: int = 16
    num_blocks: int = 1024  # device blocks, block 0 (null) included
    num_host_blocks: int = 0  # host slots for swap
    preemption_mode: PreemptionMode = "recompute"
    policy: Policy = "fcfs"
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            self._check_int(name, 1)
        self._check_int("num_blocks", 2)
        self._check_int("num_host_blocks", 0)
        self._check_int("long_prefill_token_threshold", 0)
        self._check_choice("preemption_mode", ("recompute", "swap"))
        self._check_choice("policy", ("fcfs", "priority"))
        if self.preemption_mode == "swap" and self.num_host_blocks == 0:
            raise self._bad("num_host_blocks", "must be > 0 when preemption_mode='swap'")
        if not self.enable_chunked_prefill:
            if self.max_num_batched_tokens < self.max_model_len:
                raise self._bad(
                    "max_num_batched_tokens",
                    f"must be >= max_model_len ({self.max_model_len}) without chunked prefill",
                )
            if self.long_prefill_token_threshold:
                raise self._bad("long_prefill_token_threshold", "needs chunked prefill")

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"SchedulerConfig.{name}={getattr(self, name)!r}: {why}")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._bad(name, f"must be an int >= {minimum}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise self._bad(name, f"must be one of {choices}")


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int  # waiting or preempted (recompute)
    num_swapped: int
    num_preemptions: int
    kv_usage: float  # fraction of usable device blocks in use
    prefix_cache_hit_rate: float


@dataclass
class _Step:
    """What one ``schedule()`` call has decided so far."""

    budget: int
    scheduled: dict[str, int] = field(default_factory=dict)  # id -> new tokens, in order
    preempted: list[str] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    def add(self, request: Request, num_new_tokens: int) -> None:
        self.scheduled[request.request_id] = num_new_tokens
        self.budget -= num_new_tokens


class Scheduler:
    """Decides, each step, which sequences compute which tokens into which blocks."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_pool = BlockPool(config.num_blocks)
        self.kv = KVCacheManager(self.block_pool, config.block_size, config.enable_prefix_caching)
        self.swap_space = SwapSpace(config.num_host_blocks)
        self.requests: dict[str, Request] = {}  # live sequences by id
        self._groups: dict[str, list[str]] = {}  # user request id -> its live sequence ids
        self._reserved: set[str] = set()  # ids of samples not forked yet
        self._pending: list[Request] = []  # waiting, preempted, swapped; sorted by _rank
        self._running: list[Request] = []
        self._admissions = itertools.count()
        self._finished_ids: list[str] = []  # for the runner, at the next schedule()
        self._finished_unreported: list[Request] = []  # for the next update_from_output()
        self._num_preemptions = 0

    # -- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ``ValueError`` naming the bad value (nothing changes)
        for a duplicate id, a prompt longer than ``max_model_len`` or than the whole KV cache,
        or more samples (``n``/``best_of``) than ``max_num_seqs``."""
        self._validate(request)
        request.order = next(self._admissions)
        ids = [fork_id(request.request_id, i) for i in range(request.num_samples)]
        self._reserved.update(ids[1:])
        self._groups[request.request_id] = [request.request_id]
        self.requests[request.request_id] = request
        self._enqueue(request)

    def abort_request(self, request_id: str) -> list[Request]:
        """Abort a user request (all its samples) or one sample; returns the aborted sequences.

        Raises ``ValueError`` naming the id when no live request has it.
        """
        if request_id in self._groups:
            ids = list(self._groups[request_id])
        elif request_id in self.requests:
            ids = [request_id]
        else:
            raise ValueError(f"abort_request: unknown request id {request_id!r}")
        aborted = [self.requests[i] for i in ids]
        for request in aborted:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        return aborted

    def finish_request(
        self,
        request_id: str,
        status: RequestStatus = RequestStatus.FINISHED_STOPPED,
        stop_reason: int | str | None = None,
    ) -> Request:
        """End one sequence from outside, e.g. when its text hit a stop string."""
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"finish_request: unknown request id {request_id!r}")
        if not status.is_finished:
            raise ValueError(f"finish_request: status={status} is not a finished status")
        request.stop_reason = stop_reason
        self._finish(request, status)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def stats(self) -> SchedulerStats:
        swapped = sum(r.status is RequestStatus.SWAPPED for r in self._pending)
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._pending) - swapped,
            num_swapped=swapped,
            num_preemptions=self._num_preemptions,
            kv_usage=self.block_pool.stats.usage,
            prefix_cache_hit_rate=self.kv.prefix_cache_stats.hit_rate,
        )

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Decide the next step.

        Invariant: every live sequence wants ``num_tokens - num_computed_tokens`` tokens
        computed; a step gives out at most ``max_num_batched_tokens`` of them to at most
        ``max_num_seqs`` sequences, running ones first in policy order, and only running
        sequences hold device blocks, each block table covering exactly the computed tokens
        plus the tokens scheduled now.
        """
        step = _Step(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted:
            self._schedule_pending(step)
        return self._output(step)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Apply a step's results; returns the sequences that got a token or finished
        (new forked samples included), after checking every stop condition."""
        updated, self._finished_unreported = self._finished_unreported, []
        for scheduled in scheduler_output.scheduled:
            request = self.requests.get(scheduled.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or stopped since schedule()
            if request.num_computed_tokens != scheduled.num_computed_tokens:
                raise ValueError(f"stale scheduler output for {scheduled.request_id!r}")
            request.num_computed_tokens += scheduled.num_new_tokens
            self.kv.cache_blocks(request)
            if scheduled.sample_ids:
                updated.extend(self._take_samples(request, scheduled.sample_ids, runner_output))
        return updated

    # -- running sequences -----------------------------------------------------------------

    def _schedule_running(self, step: _Step) -> None:
        for request in sorted(self._running, key=self._rank):
            if step.budget == 0 or len(step.scheduled) == self.config.max_num_seqs:
                return
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._num_new_tokens(request, step.budget)
            if self._allocate_or_preempt(request, n, step):
                step.add(request, n)

    def _allocate_or_preempt(self, request: Request, n: int, step: _Step) -> bool:
        """Allocate ``n`` token slots for a running sequence, preempting the lowest-ranked
        running sequences until it fits; False when ``request`` itself had to go."""
        while self.kv.allocate_slots(request, n) is None:
            victim = max(self._running, key=self._rank)
            assert victim.request_id not in step.scheduled  # ranks ascend through the loop
            if victim is request and len(self._running) == 1:
                self._ignore(request, request.num_computed_tokens + n)
                return False
            self._preempt(victim, step)
            if victim is request:
                return False
        return True

    def _preempt(self, victim: Request, step: _Step) -> None:
        self._running.remove(victim)
        victim.num_preemptions += 1
        self._num_preemptions += 1
        step.preempted.append(victim.request_id)
        if not (self.config.preemption_mode == "swap" and self._swap_out(victim, step)):
            self.kv.free(victim)
            victim.num_computed_tokens = 0
            victim.status = RequestStatus.PREEMPTED
        log.info("preempted %s (%s)", victim.request_id, victim.status.value)
        self._enqueue(victim)

    def _swap_out(self, victim: Request, step: _Step) -> bool:
        num_blocks = cdiv(victim.num_computed_tokens, self.config.block_size)
        slots = self.swap_space.allocate(victim.request_id, num_blocks)
        if slots is None:
            log.info("host swap space full: %s recomputes instead", victim.request_id)
            return False
        blocks = self.kv.swap_out(victim)
        step.swap_out.extend(zip(blocks, slots, strict=True))
        victim.status = RequestStatus.SWAPPED
        return True

    # -- pending sequences -----------------------------------------------------------------

    def _schedule_pending(self, step: _Step) -> None:
        cfg = self.config
        while self._pending and step.budget > 0 and len(self._running) < cfg.max_num_seqs:
            if len(step.scheduled) == cfg.max_num_seqs:
                return
            request = self._pending[0]
            if request.status is RequestStatus.SWAPPED:
                if not self._swap_in(request, step):
                    return
            elif not self._admit(request, step):
                return

    def _admit(self, request: Request, step: _Step) -> bool:
        """Start (or restart) a sequence with nothing computed; False if it must wait."""
        computed = self.kv.get_computed_blocks(request)
        n = self._limit_prefill(request.num_tokens - computed.num_tokens)
        if not self.config.enable_chunked_prefill and n > step.budget:
            return False
        n = min(n, step.budget)
        if self.kv.allocate_slots(request, n, computed) is None:
            if cdiv(request.num_tokens, self.config.block_size) > self.block_pool.num_usable_blocks:
                self._ignore(request, request.num_tokens)
                return True
            return False
        if request.status is RequestStatus.WAITING:
            request.num_cached_tokens = computed.num_tokens
        request.num_computed_tokens = computed.num_tokens
        self._start_running(request, step, n)
        return True

    def _swap_in(self, request: Request, step: _Step) -> bool:
        slots = self.swap_space.slots(request.request_id)
        n = self._num_new_tokens(request, step.budget)
        need = cdiv(request.num_computed_tokens + n, self.config.block_size)
        if need > self.block_pool.num_usable_blocks:  # not even an empty cache would do
            self._ignore(request, request.num_computed_tokens + n)
            return True
        if need > self.kv.num_free_blocks:
            return False
        blocks = self.kv.swap_in(request, len(slots))
        assert blocks is not None
        step.swap_in.extend(zip(slots, blocks, strict=True))
        self.swap_space.free(request.request_id)
        allocated = self.kv.allocate_slots(request, n)
        assert allocated is not None
        self._start_running(request, step, n)
        return True

    def _start_running(self, request: Request, step: _Step, n: int) -> None:
        self._pending.remove(request)
        request.status = RequestStatus.RUNNING
        self._running.append(request)
        step.add(request, n)

    # -- results ---------------------------------------------------------------------------

    def _take_samples(
        self, request: Request, sample_ids: tuple[str, ...], runner_output: ModelRunnerOutput
    ) -> list[Request]:
        sequences = [request, *self._fork(request, len(sample_ids))]
        for sequence in sequences:
            sid = sequence.request_id
            if sid not in runner_output.sampled_token_ids:
                raise ValueError(f"runner output has no token for {sid!r}")
            sequence.append_output(
                runner_output.sampled_token_ids[sid],
                runner_output.logprobs.get(sid),
                runner_output.top_logprobs.get(sid),
            )
            decision = check_stop(sequence, self.config.max_model_len)
            if decision is not None:
                sequence.stop_reason = decision[1]
                self._finish(sequence, decision[0])
        return sequences

    def _fork(self, parent: Request, num_samples: int) -> list[Request]:
        """Samples ``1 .. num_samples-1`` of ``parent``, sharing its blocks."""
        children = []
        for index in range(1, num_samples):
            child = parent.fork(index)
            child.order = next(self._admissions)
            self.kv.fork(parent, child)
            self._reserved.discard(child.request_id)
            self.requests[child.request_id] = child
            self._groups[parent.parent_id].append(child.request_id)
            self._running.append(child)
            children.append(child)
        return children

    def _output(self, step: _Step) -> SchedulerOutput:
        scheduled = tuple(self._scheduled_request(rid, n) for rid, n in step.scheduled.items())
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(
            scheduled=scheduled,
            swap_out=tuple(step.swap_out),
            copies=tuple(self.kv.take_copies()),
            swap_in=tuple(step.swap_in),
            preempted_ids=tuple(step.preempted),
            finished_ids=finished,
        )

    def _scheduled_request(self, request_id: str, n: int) -> ScheduledRequest:
        request = self.requests[request_id]
        start = request.num_computed_tokens
        sample_ids: tuple[str, ...] = ()
        if start + n == request.num_tokens:
            count = request.num_samples if request.will_fork else 1
            sample_ids = tuple(fork_id(request.parent_id, i) for i in range(count))
            if count == 1:
                sample_ids = (request_id,)
        return ScheduledRequest(
            request_id=request_id,
            token_ids=request.token_ids(start, start + n),
            num_computed_tokens=start,
            block_table=tuple(self.kv.block_table(request_id)),
            sample_ids=sample_ids,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=tuple(request.output_token_ids),
            index=request.index,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _rank(self, request: Request) -> tuple[float, ...]:
        """Sort key: smaller is served first and preempted last."""
        if self.config.policy == "priority":
            return (request.priority, request.arrival_time, request.order)
        return (request.arrival_time, request.order)

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self._pending, request, key=self._rank)

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        return min(self._limit_prefill(request.num_tokens - request.num_computed_tokens), budget)

    def _limit_prefill(self, n: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        return min(n, threshold) if threshold else n

    def _validate(self, request: Request) -> None:
        cfg = self.config
        rid = request.request_id
        if rid in self.requests or rid in self._reserved:
            raise ValueError(f"add_request: request id {rid!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.output_token_ids:
            raise ValueError(f"add_request: request {rid!r} is not new ({request.status.name})")
        if request.num_prompt_tokens > cfg.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt length {request.num_prompt_tokens} exceeds "
                f"max_model_len={cfg.max_model_len}"
            )
        blocks = cdiv(request.num_prompt_tokens, cfg.block_size)
        if blocks > self.block_pool.num_usable_blocks:
            raise ValueError(
                f"request {rid!r}: prompt length {request.num_prompt_tokens} needs {blocks} "
                f"KV blocks; the cache has {self.block_pool.num_usable_blocks}"
            )
        if request.num_samples > cfg.max_num_seqs:
            raise ValueError(
                f"request {rid!r}: {request.num_samples} samples (n/best_of) exceed "
                f"max_num_seqs={cfg.max_num_seqs}"
            )
        if any(fork_id(rid, i) in self.requests for i in range(1, request.num_samples)):
            raise ValueError(f"add_request: ids of request {rid!r}'s samples are in use")

    def _ignore(self, request: Request, num_tokens: int) -> None:
        bs = self.config.block_size
        request.finish_detail = (
            f"{num_tokens} tokens need {cdiv(num_tokens, bs)} KV blocks of {bs}; "
            f"the cache has {self.block_pool.num_usable_blocks}"
        )
        log.warning("request %s can never fit: %s", request.request_id, request.finish_detail)
        self._finish(request, RequestStatus.FINISHED_IGNORED)
        self._finished_unreported.append(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """End a live sequence: free its device blocks and host slots, forget it."""
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._pending.remove(request)
        self.kv.free(request)
        self.swap_space.free(request.request_id)
        request.status = status
        del self.requests[request.request_id]
        group = self._groups[request.parent_id]
        group.remove(request.request_id)
        if not group:
            del self._groups[request.parent_id]
            self._reserved.difference_update(
                fork_id(request.parent_id, i) for i in range(1, request.num_samples)
            )
        self._finished_ids.append(request.request_id)
