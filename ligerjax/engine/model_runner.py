"""The model runner: one ``SchedulerOutput`` in, one device step, sampled tokens out.

``execute`` follows the step protocol of :mod:`ligerjax.engine.scheduler_output`: swap-outs,
copy-on-write copies and swap-ins first, then one jitted program,
``logits, kv_pages = step(weights, kv_pages, batch)``, over the scheduled sequences' new
tokens packed into one row, then the sampler. The packed row is padded to a token bucket
(powers of two and their midpoints, from ``min_token_bucket`` up to ``max_num_batched_tokens``),
and every other shape follows from that bucket (sequence rows: ``min(T, max_num_seqs)``
rounded up; block tables: ``max_model_len / block_size`` wide), so a handful of programs
serve every step and a steady decode never recompiles. Weights are jit arguments, the
pages are donated. On the CPU the runner keeps its own copy of the float32 linear weights
packed for the C++ matmul (:mod:`ligerjax.engine.weight_packing`), made once at load.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ligerjax.engine import kv_cache_storage as storage
from ligerjax.engine.kv_cache_storage import HostKVBuffer, KVCacheSpec, KVPages
from ligerjax.engine.paged_kv_cache import PagedKVCache
from ligerjax.engine.sampler import SamplerOutput, SamplingRow, make_batch, sample
from ligerjax.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from ligerjax.engine.static_runner import CausalLM
from ligerjax.engine.weight_packing import pack_weights, set_live_rows
from ligerjax.kernels.native_matmul import matmul_unavailable_reason
from ligerjax.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class ModelRunnerConfig:
    """Shapes of the runner's programs and of its KV storage."""

    num_blocks: int  # device blocks, the null block included
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    num_host_blocks: int = 0
    min_token_bucket: int = 1  # smallest token bucket
    kv_dtype: str | None = None  # default: the model's dtype
    # float32 linears (and a tied head) packed for the C++ matmul (weight_packing); None:
    # where that kernel runs, i.e. on the CPU backend once built
    packed_weights: bool | None = None

    def __post_init__(self) -> None:
        for name, minimum in (
            ("num_blocks", 2),
            ("block_size", 1),
            ("max_num_seqs", 1),
            ("max_num_batched_tokens", 1),
            ("max_model_len", 1),
            ("num_host_blocks", 0),
            ("min_token_bucket", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"ModelRunnerConfig.{name}={value!r}: must be an int >= {minimum}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def token_buckets(self) -> tuple[int, ...]:
        """Padded token counts a step can have, smallest first: powers of two, and from 16
        up the midpoints between them (1, 2, 4, 8, 16, 24, 32, 48, ...), so padding wastes
        at most a third once steps are big enough for it to cost."""
        top = _pow2(self.max_num_batched_tokens)
        buckets, b = [], min(_pow2(self.min_token_bucket), top)
        while b < top:
            buckets.append(b)
            if b >= 16:
                buckets.append(b + b // 2)
            b *= 2
        return (*buckets, top)

    def sample_bucket(self, num_rows: int, num_seqs_padded: int) -> int:
        """Sampler rows for ``num_rows`` samples of a step with ``num_seqs_padded`` sequence
        rows: a power of two, or the step's rows when they are fewer and still enough (then
        the step's logits are sampled as they are, without a gather)."""
        R = _pow2(num_rows)
        return num_seqs_padded if num_rows <= num_seqs_padded < R else R

    def seq_bucket(self, num_tokens_padded: int) -> int:
        """Sequence rows of a step padded to ``num_tokens_padded`` tokens (a sequence has
        at least one token, so ``T`` rows always suffice)."""
        return min(num_tokens_padded, _pow2(self.max_num_seqs))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepBatch:
    """Device inputs of one step (built as numpy on the host)."""

    token_ids_t: Any  # [T] int32
    positions_t: Any  # [T] int32
    slot_mapping_t: Any  # [T] int32, N * P for padding
    block_tables_bm: Any  # [B, M] int32
    context_lens_b: Any  # [B] int32
    cu_q_lens_b1: Any  # [B + 1] int32
    logits_index_b: Any  # [B] int32, each sequence's last token in the packed row


class ModelStructure:
    """A model's graph and weight tree structure: the static argument of the step program.

    Hashed once: jit hashes its static arguments on every call, and hashing an ``nnx``
    graph walks every module (~5 ms a step for SmolLM2's 30 layers)."""

    def __init__(self, graphdef: nnx.GraphDef, treedef: Any):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelStructure) and (
            self is other
            or (self._hash, self.graphdef, self.treedef)
            == (other._hash, other.graphdef, other.treedef)
        )


@functools.partial(jax.jit, static_argnames=("structure",), donate_argnames=("kv_pages",))
def _step(
    weights: list[jax.Array],
    kv_pages: KVPages,
    batch: StepBatch,
    *,
    structure: ModelStructure,
) -> tuple[jax.Array, KVPages]:
    """``logits, kv_pages = step(weights, kv_pages, batch)``: logits [B, V] of each
    sequence's last token. One module-level jit, so runners of one model share programs."""
    state = jax.tree.unflatten(structure.treedef, weights)
    model = cast(CausalLM, nnx.merge(structure.graphdef, state))
    # Packed products skip the bucket's padding rows: tokens past the last sequence's, and
    # sequence rows past the scheduled ones (each has a context).
    set_live_rows(
        model,
        tokens=batch.cu_q_lens_b1[-1],
        head=jnp.sum(batch.context_lens_b > 0, dtype=jnp.int32),
    )
    cache = PagedKVCache(
        kv_pages,
        batch.slot_mapping_t,
        batch.block_tables_bm,
        batch.context_lens_b,
        batch.cu_q_lens_b1,
    )
    h_1te, cache = model.hidden_states(batch.token_ids_t[None], batch.positions_t[None], cache)
    logits_bv = model.logits(h_1te[0, batch.logits_index_b])
    return logits_bv, cache.pages


class ModelRunner:
    """Runs a causal LM (``hidden_states``/``logits``, cache in and out) on scheduler steps."""

    def __init__(
        self,
        model: nnx.Module,
        config: ModelRunnerConfig,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        vocab_size: int,
        dtype: str = "float32",
        eos_token_ids: Sequence[int] = (),
        tied_head: bool = False,
    ) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.spec = KVCacheSpec(
            num_layers, config.block_size, num_kv_heads, head_dim, config.kv_dtype or dtype
        )
        self.packed_weights = (
            config.packed_weights
            if config.packed_weights is not None
            else jax.default_backend() == "cpu" and matmul_unavailable_reason() is None
        )
        if self.packed_weights:
            model = pack_weights(model, tied_head=tied_head)
        self.graphdef, state = nnx.split(model)
        self.weights = jax.tree.leaves(state)
        self._structure = ModelStructure(self.graphdef, jax.tree.structure(state))
        self.kv_pages: KVPages = storage.allocate_kv_pages(self.spec, config.num_blocks)
        self.host_kv = (
            HostKVBuffer.allocate(self.spec, config.num_host_blocks)
            if config.num_host_blocks
            else None
        )
        self.num_steps = 0

    def num_compiled_steps(self) -> int:
        """Step programs compiled in this process so far (all runners: they share a cache)."""
        return int(_step._cache_size())  # type: ignore[attr-defined]

    def _run_step(self, batch: StepBatch) -> jax.Array:
        logits_bv, self.kv_pages = _step(
            self.weights, self.kv_pages, batch, structure=self._structure
        )
        return logits_bv

    # -- one step ----------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's block moves, compute its tokens' K/V and sample (see module doc)."""
        self._move_blocks(out)
        if not out.scheduled:
            return ModelRunnerOutput({})
        batch = self.build_batch(out.scheduled)
        logits_bv = self._run_step(batch)
        self.num_steps += 1
        return self._sample(logits_bv, out.scheduled)

    def warm_up(self, buckets: Sequence[int] | None = None) -> None:
        """Compile the step for ``buckets`` (default: every token bucket) on dummy inputs,
        the greedy sampler for every row bucket up to ``max_num_seqs``, and the picking of
        the sampled rows' logits out of every step's (a prefix or a gather)."""
        for T in buckets or self.config.token_buckets():
            jax.block_until_ready(self._run_step(self._empty_batch(T)))
        row = SamplingRow(SamplingParams(temperature=0.0), 0, (), ())
        pow2 = {1 << i for i in range(_pow2(self.config.max_num_seqs).bit_length())}
        seqs = {self.config.seq_bucket(T) for T in self.config.token_buckets()}
        for R in sorted(pow2 | seqs):
            batch, flags = make_batch([row] * R, self.vocab_size, R)
            logits_rv = jnp.zeros((R, self.vocab_size), jnp.float32)
            jax.block_until_ready(sample(logits_rv, batch, flags=flags))
        # The two ways _pick_rows takes the sampled rows' logits out of a step's.
        for B in sorted(seqs):
            logits_bv = jnp.zeros((B, self.vocab_size), jnp.float32)
            for R in sorted({r for r in pow2 if r <= B} | {B}):  # sample_bucket's choices
                jax.block_until_ready(logits_bv[np.zeros(R, np.int32)])  # a gather
                if R < B:  # all B rows are taken as they are
                    jax.block_until_ready(logits_bv[:R])  # a prefix

    def _move_blocks(self, out: SchedulerOutput) -> None:
        if out.swap_out or out.swap_in:
            if self.host_kv is None:
                raise ValueError("scheduler swapped blocks but num_host_blocks=0")
            storage.swap_out(self.kv_pages, self.host_kv, out.swap_out)
        if out.copies:
            self.kv_pages = storage.copy_blocks(self.kv_pages, out.copies)
        if out.swap_in:
            assert self.host_kv is not None
            self.kv_pages = storage.swap_in(self.kv_pages, self.host_kv, out.swap_in)

    # -- host-side inputs --------------------------------------------------------------------

    def _bucket(self, num_tokens: int) -> int:
        for b in self.config.token_buckets():
            if b >= num_tokens:
                return b
        raise ValueError(
            f"step has {num_tokens} tokens: more than max_num_batched_tokens="
            f"{self.config.max_num_batched_tokens}"
        )

    def _empty_batch(self, T: int) -> StepBatch:
        cfg = self.config
        B, M = cfg.seq_bucket(T), cfg.max_blocks_per_seq
        pad_slot = cfg.num_blocks * cfg.block_size
        return StepBatch(
            token_ids_t=np.zeros(T, np.int32),
            positions_t=np.zeros(T, np.int32),
            slot_mapping_t=np.full(T, pad_slot, np.int32),
            block_tables_bm=np.zeros((B, M), np.int32),
            context_lens_b=np.zeros(B, np.int32),
            cu_q_lens_b1=np.zeros(B + 1, np.int32),
            logits_index_b=np.zeros(B, np.int32),
        )

    def build_batch(self, scheduled: Sequence[ScheduledRequest]) -> StepBatch:
        """Pack the scheduled sequences' new tokens into one padded row with its metadata."""
        cfg = self.config
        P = cfg.block_size
        q_lens = np.fromiter((s.num_new_tokens for s in scheduled), np.int32, len(scheduled))
        starts = np.fromiter((s.num_computed_tokens for s in scheduled), np.int32, len(scheduled))
        n_real = int(q_lens.sum())
        batch = self._empty_batch(self._bucket(n_real))
        n_seqs = len(scheduled)
        batch.token_ids_t[:n_real] = np.fromiter(
            (t for s in scheduled for t in s.token_ids), np.int32, n_real
        )
        for i, s in enumerate(scheduled):
            batch.block_tables_bm[i, : len(s.block_table)] = s.block_table
        cu = batch.cu_q_lens_b1
        cu[1 : n_seqs + 1] = np.cumsum(q_lens)
        cu[n_seqs + 1 :] = n_real
        seq_t = np.repeat(np.arange(n_seqs), q_lens)
        pos_t = np.arange(n_real, dtype=np.int32) - cu[seq_t] + starts[seq_t]
        batch.positions_t[:n_real] = pos_t
        blocks_t = batch.block_tables_bm[seq_t, pos_t // P]
        batch.slot_mapping_t[:n_real] = blocks_t * P + pos_t % P
        batch.context_lens_b[:n_seqs] = starts + q_lens
        batch.logits_index_b[:n_seqs] = cu[1 : n_seqs + 1] - 1
        return batch

    # -- sampling ----------------------------------------------------------------------------

    def _sample(
        self, logits_bv: jax.Array, scheduled: Sequence[ScheduledRequest]
    ) -> ModelRunnerOutput:
        rows: list[SamplingRow] = []
        src: list[int] = []
        ids: list[str] = []
        for i, s in enumerate(scheduled):
            for index, sid in enumerate(s.sample_ids):
                rows.append(self._sampling_row(s, index if len(s.sample_ids) > 1 else s.index))
                src.append(i)
                ids.append(sid)
        if not rows:
            return ModelRunnerOutput({})
        R = self.config.sample_bucket(len(rows), logits_bv.shape[0])
        batch, flags = make_batch(rows, self.vocab_size, R)
        src_r = np.zeros(R, np.int32)
        src_r[: len(src)] = src
        picked_rv = _pick_rows(logits_bv, src, src_r)
        result: SamplerOutput = jax.device_get(sample(picked_rv, batch, flags=flags))
        n = len(ids)
        tokens = result.token_b[:n].tolist()
        logprobs = result.logprob_b[:n].tolist()
        top: dict[str, dict[int, float]] = {}
        for r, (sid, row) in enumerate(zip(ids, rows, strict=True)):
            if row.params.logprobs is not None:
                k = row.params.logprobs
                top[sid] = dict(
                    zip(
                        result.top_ids_bk[r, :k].tolist(),
                        result.top_logprobs_bk[r, :k].tolist(),
                        strict=True,
                    )
                )
                top[sid].setdefault(tokens[r], logprobs[r])
        return ModelRunnerOutput(
            dict(zip(ids, tokens, strict=True)), dict(zip(ids, logprobs, strict=True)), top
        )

    def _sampling_row(self, s: ScheduledRequest, index: int) -> SamplingRow:
        sp = s.sampling_params
        seed = (sp.seed or 0) + index
        # A fork's samples all start from the parent's prompt: no outputs yet.
        outputs = s.output_token_ids
        suppress: tuple[int, ...] = ()
        if len(outputs) < sp.min_tokens:
            stop_ids = () if sp.ignore_eos else self.eos_token_ids
            suppress = tuple(sorted(set(stop_ids) | set(sp.stop_token_ids)))
        return SamplingRow(sp, seed, s.prompt_token_ids, outputs, suppress)


def _pick_rows(logits_bv: jax.Array, src: list[int], src_r: np.ndarray) -> jax.Array:  # [R, V]
    """The sampled rows' logits: row r is ``logits_bv[src_r[r]]`` for r < len(src). When the
    sampled rows are the first ones in order, a prefix of ``logits_bv`` serves (the padding
    rows then hold other rows' logits, and their samples are dropped) and no [R, V] gather
    is made."""
    R, B = len(src_r), logits_bv.shape[0]
    if R <= B and src == list(range(len(src))):
        return logits_bv if R == B else logits_bv[:R]
    return logits_bv[src_r]
