"""Batched token sampling on device: penalties, temperature, top-k, top-p, min-p, seeds.

The host builds a :class:`SamplingBatch` (plain numpy arrays, one row per sequence) from the
requests' :class:`~ligerjax.SamplingParams`; :func:`sample` runs on device. Which filters
run is a static property of the batch, so a batch of greedy requests never pays for a sort
(and, on the CPU, runs as one C++ pass: :mod:`ligerjax.kernels.native_sampling`).
Every row draws from its own key, ``fold_in(key(seed), step)``, so a request's tokens do
not depend on what else is in the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ligerjax.kernels.native_sampling import greedy_sample
from ligerjax.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingFlags:
    """Static switches: which parts of the sampler the batch needs (a compile-time key)."""

    penalties: bool
    sort: bool  # top-k or top-p
    min_p: bool
    suppress: bool
    logprobs: int  # top logprobs to return (0: only the sampled token's)
    random: bool = True  # some row samples (temperature > 0); False: all greedy, no draws


Rows = jax.Array | np.ndarray  # built as numpy on the host, jax.Array inside `sample`


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as arrays; padding ids equal V (dropped by scatters)."""

    temperature_b: Rows  # [B] f32, 0 = greedy
    top_k_b: Rows  # [B] int32, 0 = off
    top_p_b: Rows  # [B] f32
    min_p_b: Rows  # [B] f32
    repetition_penalty_b: Rows  # [B] f32
    presence_penalty_b: Rows  # [B] f32
    frequency_penalty_b: Rows  # [B] f32
    seed_b: Rows  # [B] uint32
    step_b: Rows  # [B] int32, tokens generated so far (the key's counter)
    prompt_ids_bl: Rows  # [B, Lp] int32, padded with V
    output_ids_bl: Rows  # [B, Lo] int32, padded with V
    suppress_ids_bm: Rows  # [B, M] int32, tokens banned this step (min_tokens), padded with V


def _pad_rows(rows: Sequence[Sequence[int]], pad: int, min_width: int = 1) -> np.ndarray:
    width = _bucket(max([len(r) for r in rows] + [min_width]))
    out = np.full((len(rows), width), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _bucket(n: int) -> int:
    """Round a padded width up to a power of two, so few shapes are ever compiled."""
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class SamplingRow:
    """Host view of one row: its params, seed, and the tokens seen so far."""

    params: SamplingParams
    seed: int
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    suppress_ids: Sequence[int] = ()


def make_batch(
    rows: Sequence[SamplingRow], vocab_size: int, pad_to: int
) -> tuple[SamplingBatch, SamplingFlags]:
    """Arrays for ``rows`` padded to ``pad_to`` rows (padding rows are greedy and ignored)."""
    if not rows or len(rows) > pad_to:
        raise ValueError(f"make_batch: {len(rows)} rows do not fit pad_to={pad_to}")
    padded = list(rows) + [SamplingRow(SamplingParams(temperature=0.0), 0, (), ())] * (
        pad_to - len(rows)
    )
    ps = [r.params for r in padded]
    penalties = any(
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in ps
    )
    flags = SamplingFlags(
        penalties=penalties,
        sort=any(not p.greedy and (p.top_k or p.top_p < 1.0) for p in ps),
        min_p=any(not p.greedy and p.min_p > 0 for p in ps),
        suppress=any(r.suppress_ids for r in padded),
        logprobs=max([p.logprobs or 0 for p in ps]),
        random=any(not p.greedy for p in ps),
    )
    f32 = functools.partial(np.asarray, dtype=np.float32)
    batch = SamplingBatch(
        temperature_b=f32([p.temperature for p in ps]),
        top_k_b=np.asarray([p.top_k for p in ps], np.int32),
        top_p_b=f32([p.top_p for p in ps]),
        min_p_b=f32([p.min_p for p in ps]),
        repetition_penalty_b=f32([p.repetition_penalty for p in ps]),
        presence_penalty_b=f32([p.presence_penalty for p in ps]),
        frequency_penalty_b=f32([p.frequency_penalty for p in ps]),
        seed_b=np.asarray([r.seed & 0xFFFFFFFF for r in padded], np.uint32),
        step_b=np.asarray([len(r.output_ids) for r in padded], np.int32),
        prompt_ids_bl=_pad_rows([r.prompt_ids if penalties else () for r in padded], vocab_size),
        output_ids_bl=_pad_rows([r.output_ids if penalties else () for r in padded], vocab_size),
        suppress_ids_bm=_pad_rows([r.suppress_ids for r in padded], vocab_size),
    )
    return batch, flags


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    token_b: jax.Array  # [B] int32
    logprob_b: jax.Array  # [B] f32, log-probability of the sampled token under the model
    top_ids_bk: jax.Array  # [B, k] int32, k = the most top logprobs a row asked for (maybe 0)
    top_logprobs_bk: jax.Array  # [B, k] f32


def _apply_penalties(logits_bv: jax.Array, s: SamplingBatch) -> jax.Array:
    B, V = logits_bv.shape
    rows = jnp.arange(B)[:, None]
    counts_bv = jnp.zeros((B, V), jnp.int32).at[rows, s.output_ids_bl].add(1, mode="drop")
    in_prompt_bv = jnp.zeros((B, V), jnp.bool_).at[rows, s.prompt_ids_bl].set(True, mode="drop")
    seen_bv = in_prompt_bv | (counts_bv > 0)
    rp = s.repetition_penalty_b[:, None]
    logits_bv = jnp.where(
        seen_bv, jnp.where(logits_bv > 0, logits_bv / rp, logits_bv * rp), logits_bv
    )
    logits_bv = logits_bv - s.frequency_penalty_b[:, None] * counts_bv
    return logits_bv - s.presence_penalty_b[:, None] * (counts_bv > 0)


def _filter_top_k_top_p(logits_bv: jax.Array, s: SamplingBatch) -> jax.Array:
    V = logits_bv.shape[1]
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)  # descending
    k_b = jnp.where(s.top_k_b > 0, jnp.minimum(s.top_k_b, V), V)
    kth_b = jnp.take_along_axis(sorted_bv, (k_b - 1)[:, None], axis=-1)  # [B, 1]
    probs_bv = jax.nn.softmax(jnp.where(sorted_bv >= kth_b, sorted_bv, -jnp.inf), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p.
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_bv = (mass_before_bv < s.top_p_b[:, None]) & (sorted_bv >= kth_b)
    cutoff_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bv >= cutoff_b, logits_bv, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("flags",))
def sample(logits_bv: jax.Array, s: SamplingBatch, *, flags: SamplingFlags) -> SamplerOutput:
    """One token per row. ``logits_bv``: [B, V] f32 raw model logits."""
    B = logits_bv.shape[0]
    if not (flags.random or flags.penalties or flags.suppress or flags.logprobs):
        token_b, logprob_b = greedy_sample(logits_bv)
        no_top = jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
        return SamplerOutput(token_b, logprob_b, *no_top)
    raw_bv = logits_bv
    # log p = (logit - max) - log Σ exp(logit - max), log_softmax's arithmetic, evaluated only
    # at the tokens returned: no [B, V] log-softmax to write and read back.
    max_b1 = jnp.max(raw_bv, axis=-1, keepdims=True)
    log_sum_b1 = jnp.log(jnp.sum(jnp.exp(raw_bv - max_b1), axis=-1, keepdims=True))

    def log_prob(logits_bk: jax.Array) -> jax.Array:
        return (logits_bk - max_b1) - log_sum_b1

    if flags.penalties:
        logits_bv = _apply_penalties(logits_bv, s)
    if flags.suppress:
        rows = jnp.arange(B)[:, None]
        logits_bv = logits_bv.at[rows, s.suppress_ids_bm].set(-jnp.inf, mode="drop")
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    token_b = _draw(logits_bv, greedy_b, s, flags) if flags.random else greedy_b
    logprob_b = log_prob(jnp.take_along_axis(raw_bv, token_b[:, None], axis=-1))[:, 0]
    if flags.logprobs == 0:  # nobody asked for top tokens: skip the top-k over the vocab
        return SamplerOutput(
            token_b, logprob_b, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
        )
    top_logits_bk, top_ids_bk = jax.lax.top_k(raw_bv, flags.logprobs)
    return SamplerOutput(token_b, logprob_b, top_ids_bk.astype(jnp.int32), log_prob(top_logits_bk))


def _draw(
    logits_bv: jax.Array, greedy_b: jax.Array, s: SamplingBatch, flags: SamplingFlags
) -> jax.Array:
    """Greedy rows keep ``greedy_b``; the others draw from the filtered, tempered logits."""
    temp_b = jnp.where(s.temperature_b > 0, s.temperature_b, 1.0)
    scaled_bv = logits_bv / temp_b[:, None]
    if flags.sort:
        scaled_bv = _filter_top_k_top_p(scaled_bv, s)
    if flags.min_p:
        probs_bv = jax.nn.softmax(scaled_bv, axis=-1)
        floor_b1 = s.min_p_b[:, None] * jnp.max(probs_bv, axis=-1, keepdims=True)
        scaled_bv = jnp.where(probs_bv >= floor_b1, scaled_bv, -jnp.inf)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
        s.seed_b, s.step_b
    )
    drawn_b = jax.vmap(jax.random.categorical)(keys, scaled_bv).astype(jnp.int32)
    return jnp.where(s.temperature_b > 0, drawn_b, greedy_b)
