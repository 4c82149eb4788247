"""The real SmolLM2-135M-Instruct GGUF, loaded by us and by Transformers: same logits, same
greedy continuations (ours batched through a DenseKVCache, jitted with the weights as
arguments; theirs with ``generate(do_sample=False)``)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import DenseKVCache, LlamaConfig

logger = logging.getLogger(__name__)

PROMPTS = {
    "prose": "The history of the Roman Empire spans",
    "code": "def quicksort(arr):\n",
    "question": "Question: What is the boiling point of water at sea level?\nAnswer:",
    "list": "Here is a list of five fruits:\n1.",
    "numbers": "The first ten prime numbers are 2, 3, 5,",
}
CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]
NEW_TOKENS = 32


def greedy(model, prompts: list[list[int]], new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuations of a right-padded batch, and each prompt's last-position logits.

    Padding tokens sit at position S (past the cache), so their K/V writes are dropped.
    """
    graphdef, state = nnx.split(model)
    cfg: LlamaConfig = model.config
    lengths = np.array([len(p) for p in prompts])
    B, T = len(prompts), int(lengths.max())
    S = T + new_tokens
    tokens_bt = np.zeros((B, T), np.int32)
    positions_bt = np.full((B, T), S, np.int32)
    for b, p in enumerate(prompts):
        tokens_bt[b, : len(p)] = p
        positions_bt[b, : len(p)] = np.arange(len(p))

    @jax.jit
    def step(state, tokens_bt, positions_bt, cache):
        return nnx.merge(graphdef, state)(tokens_bt, positions_bt, cache)

    cache = DenseKVCache.zeros(cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    logits_btv, cache = step(state, jnp.asarray(tokens_bt), jnp.asarray(positions_bt), cache)
    last_bv = np.asarray(logits_btv)[np.arange(B), lengths - 1]
    out = [last_bv.argmax(-1)]
    for i in range(new_tokens - 1):
        positions_b1 = jnp.asarray(lengths + i, jnp.int32)[:, None]
        tokens_b1 = jnp.asarray(out[-1], jnp.int32)[:, None]
        logits_b1v, cache = step(state, tokens_b1, positions_b1, cache)
        out.append(np.asarray(logits_b1v)[:, 0].argmax(-1))
    return np.stack(out, axis=1), last_bv


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer) -> dict[str, list[int]]:
    ids = {name: smollm2_tokenizer.encode(text) for name, text in PROMPTS.items()}
    ids["chat"] = smollm2_tokenizer.encode(smollm2_tokenizer.apply_chat_template(CHAT))
    return ids


@pytest.fixture(scope="module")
def ours(smollm2, prompt_ids) -> dict[str, tuple[list[int], np.ndarray]]:
    names = list(prompt_ids)
    tokens_bn, last_bv = greedy(smollm2[0], [prompt_ids[n] for n in names], NEW_TOKENS)
    return {n: (tokens_bn[i].tolist(), last_bv[i]) for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def theirs(hf_smollm2, prompt_ids) -> dict[str, tuple[list[int], np.ndarray]]:
    import torch

    results = {}
    with torch.no_grad():
        for name, ids in prompt_ids.items():
            input_ids = torch.tensor([ids])
            logits = hf_smollm2(input_ids).logits[0, -1].float().numpy()
            out = hf_smollm2.generate(
                input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2
            )
            results[name] = (out[0, len(ids) :].tolist(), logits)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", [*PROMPTS, "chat"])
def test_last_position_logits_match_transformers(ours, theirs, name):
    a, b = ours[name][1], theirs[name][1]
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    logger.info("%s: max|ours - transformers| / max|transformers| = %.2e", name, rel)
    assert rel < 1e-3, f"{name}: relative logit error {rel:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*PROMPTS, "chat"])
def test_greedy_continuation_matches_transformers(ours, theirs, smollm2_tokenizer, name):
    mine, hf = ours[name][0], theirs[name][0]
    if len(hf) < NEW_TOKENS:  # Transformers stops at EOS; we ran on past it
        assert hf[-1] in smollm2_tokenizer.eos_token_ids
    assert mine[: len(hf)] == hf, (
        f"{name}: ours {smollm2_tokenizer.decode(mine)!r} vs "
        f"transformers {smollm2_tokenizer.decode(hf)!r}"
    )


@pytest.mark.slow
def test_continuations_are_long_and_meaningful(theirs, smollm2_tokenizer):
    """Guard the comparison itself: most prompts run the full 32 tokens, and the answers read."""
    full = [name for name, (ids, _) in theirs.items() if len(ids) == NEW_TOKENS]
    assert len(full) >= 4, {n: len(ids) for n, (ids, _) in theirs.items()}
    assert "100" in smollm2_tokenizer.decode(theirs["question"][0])


def test_loaded_config_matches_the_preset(smollm2):
    _, _, config = smollm2
    preset = LlamaConfig.preset("smollm2-135m")
    assert config.replace(rms_norm_eps=preset.rms_norm_eps) == preset
    assert config.rms_norm_eps == pytest.approx(1e-5)
