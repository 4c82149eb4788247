"""Static batching: prefill a padded batch, then decode every row until all have finished.

This is the classic ``generate`` loop (what Hugging Face Transformers does), on a contiguous
per-row KV cache. It is ligerjax's simplest execution path and the baseline that continuous
batching is measured against. Shapes are bucketed to powers of two, so a handful of
programs serve every batch; the weights are jit arguments, never constants.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ligerjax.engine.sampler import SamplerOutput, SamplingRow, make_batch, sample

log = logging.getLogger(__name__)

# Shortest cache compiled: short requests of any length share one decode program.
MIN_CACHE_LEN = 256


class CausalLM(Protocol):
    """What the runner needs of a model (``models.Llama`` has it)."""

    def hidden_states(
        self, tokens_bt: jax.Array, positions_bt: jax.Array, cache: Any
    ) -> tuple[jax.Array, Any]: ...

    def logits(self, h_bte: jax.Array) -> jax.Array: ...


MakeCache = Callable[[int, int], Any]  # (batch, max_len) -> cache pytree with .attend(...)


@dataclass(frozen=True)
class StepTokens:
    """Tokens sampled for each live row in one step (rows that already finished are absent)."""

    token_ids: dict[int, int]
    logprobs: dict[int, float]
    top_logprobs: dict[int, dict[int, float]]


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at ``maximum``."""
    b = 1 << max(0, (max(n, minimum) - 1).bit_length())
    return min(b, maximum) if maximum is not None else b


class StaticBatchRunner:
    """Runs a causal LM (``hidden_states``/``logits`` methods, cache in and out) on batches."""

    def __init__(
        self, model: nnx.Module, make_cache: MakeCache, *, max_model_len: int, vocab_size: int
    ):
        self.graphdef, self.state = nnx.split(model)
        self.make_cache = make_cache
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(4,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(3,))

    def _prefill_fn(self, state, tokens_bt, positions_bt, last_b, cache):
        model = cast(CausalLM, nnx.merge(self.graphdef, state))
        h_bte, cache = model.hidden_states(tokens_bt, positions_bt, cache)
        h_be = jnp.take_along_axis(h_bte, last_b[:, None, None], axis=1)[:, 0]
        return model.logits(h_be), cache

    def _decode_fn(self, state, tokens_b, positions_b, cache):
        model = cast(CausalLM, nnx.merge(self.graphdef, state))
        h_bte, cache = model.hidden_states(tokens_b[:, None], positions_b[:, None], cache)
        return model.logits(h_bte[:, 0]), cache

    def run(
        self,
        rows: Sequence[SamplingRow],
        is_finished: Callable[[int, int], bool],
    ) -> Iterator[StepTokens]:
        """Generate for ``rows`` (prompt ids in ``row.prompt_ids``), yielding each step's tokens.

        ``is_finished(row, token)`` is asked after each sampled token; a row stops once it says
        so. Stops when every row has finished or the cache is full.
        """
        lens = [len(r.prompt_ids) for r in rows]
        max_new = max(r.params.max_tokens or self.max_model_len for r in rows)
        B = bucket(len(rows))
        T = bucket(max(lens), minimum=16)
        S = bucket(
            max(lens) + max_new, minimum=max(T, MIN_CACHE_LEN), maximum=max(self.max_model_len, T)
        )
        tokens_bt = np.zeros((B, T), np.int32)
        positions_bt = np.full((B, T), S, np.int32)  # position >= S: padding, never written
        for i, r in enumerate(rows):
            tokens_bt[i, : lens[i]] = r.prompt_ids
            positions_bt[i, : lens[i]] = np.arange(lens[i])
        last_b = np.asarray([max(n - 1, 0) for n in lens] + [0] * (B - len(rows)), np.int32)
        logits_bv, cache = self._prefill(
            self.state, tokens_bt, positions_bt, last_b, self.make_cache(B, S)
        )
        outputs: list[list[int]] = [[] for _ in rows]
        live = set(range(len(rows)))
        positions_b = last_b + 1
        while live:
            step = self._sample(logits_bv, rows, outputs, B)
            live_tokens = {i: int(step.token_b[i]) for i in sorted(live)}
            for i, t in live_tokens.items():
                outputs[i].append(t)
                if is_finished(i, t) or lens[i] + len(outputs[i]) >= S:
                    live.discard(i)
            yield self._step_tokens(step, live_tokens)
            if not live:
                break
            tokens_b = np.zeros((B,), np.int32)
            for i in range(len(rows)):
                tokens_b[i] = outputs[i][-1]
            logits_bv, cache = self._decode(
                self.state, tokens_b, positions_b.astype(np.int32), cache
            )
            positions_b = positions_b + 1

    def _sample(self, logits_bv, rows, outputs, B) -> SamplerOutput:
        step_rows = [
            SamplingRow(
                r.params,
                r.seed,
                r.prompt_ids,
                out,
                r.suppress_ids if len(out) < r.params.min_tokens else (),
            )
            for r, out in zip(rows, outputs, strict=True)
        ]
        batch, flags = make_batch(step_rows, self.vocab_size, B)
        return jax.device_get(sample(logits_bv, batch, flags=flags))

    @staticmethod
    def _step_tokens(step: SamplerOutput, live_tokens: dict[int, int]) -> StepTokens:
        top = {
            i: dict(zip(step.top_ids_bk[i].tolist(), step.top_logprobs_bk[i].tolist(), strict=True))
            for i in live_tokens
        }
        return StepTokens(live_tokens, {i: float(step.logprob_b[i]) for i in live_tokens}, top)
