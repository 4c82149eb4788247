"""The batched sampler: each filter, seeds independent of batching, penalties exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.engine.sampler import SamplingRow, make_batch, sample
from ligerjax.sampling_params import SamplingParams

V = 32


def _sample(rows, logits_bv, pad_to=None):
    batch, flags = make_batch(rows, V, pad_to or len(rows))
    return jax.device_get(sample(jnp.asarray(logits_bv, jnp.float32), batch, flags=flags))


def _row(seed=0, prompt=(1,), out=(), suppress=(), **kw):
    return SamplingRow(SamplingParams(**kw), seed, prompt, out, suppress)


@pytest.fixture
def logits_bv():
    return np.random.default_rng().normal(size=(4, V)).astype(np.float32) * 3


def test_greedy_is_argmax(logits_bv):
    out = _sample([_row(temperature=0.0)] * 4, logits_bv)
    np.testing.assert_array_equal(out.token_b, logits_bv.argmax(-1))


def test_top_k_one_and_tiny_top_p_and_full_min_p_are_argmax(logits_bv):
    rows = [
        _row(seed=1, temperature=1.5, top_k=1),
        _row(seed=2, temperature=1.5, top_p=1e-6),
        _row(seed=3, temperature=1.5, min_p=1.0),
        _row(seed=4, temperature=1.5, top_k=1, top_p=0.5),
    ]
    out = _sample(rows, logits_bv)
    np.testing.assert_array_equal(out.token_b, logits_bv.argmax(-1))


def test_top_k_keeps_only_the_k_best():
    logits = np.random.default_rng().normal(size=(V,)).astype(np.float32)
    best3 = set(np.argsort(-logits)[:3].tolist())
    rows = [_row(seed=s, temperature=2.0, top_k=3) for s in range(64)]
    out = _sample(rows, np.tile(logits, (64, 1)))
    drawn = set(out.token_b.tolist())
    assert drawn <= best3 and len(drawn) > 1


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4), np.float32))
    rows = [_row(seed=s, temperature=1.0, top_p=0.7) for s in range(64)]
    out = _sample(rows, np.tile(logits, (64, 1)))
    assert set(out.token_b.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8


def test_sampling_frequencies_follow_the_distribution():
    probs = np.array([0.6, 0.3, 0.1], np.float32)
    logits = np.full((V,), -1e9, np.float32)
    logits[:3] = np.log(probs)
    rows = [_row(seed=s, temperature=1.0) for s in range(2000)]
    out = _sample(rows, np.tile(logits, (2000, 1)))
    freq = np.bincount(out.token_b, minlength=3)[:3] / 2000
    np.testing.assert_allclose(freq, probs, atol=0.05)


def test_seeded_rows_do_not_depend_on_the_batch(logits_bv):
    row = _row(seed=1234, temperature=1.0, out=(5, 6))
    alone = _sample([row], logits_bv[2:3], pad_to=1)
    others = [_row(seed=9, temperature=0.7), _row(temperature=0.0)]
    mixed_logits = np.concatenate([logits_bv[:3], np.zeros((5, V), np.float32)])
    mixed = _sample([*others, row], mixed_logits, pad_to=8)
    assert alone.token_b[0] == mixed.token_b[2]


def test_suppressed_ids_are_never_drawn(logits_bv):
    best = int(logits_bv[0].argmax())
    out = _sample([_row(temperature=0.0, suppress=(best,))], logits_bv[:1])
    assert out.token_b[0] != best


def test_penalties_match_their_definitions():
    logits = np.zeros((1, V), np.float32)
    logits[0, :4] = [2.0, 1.9, -1.0, 0.5]
    row = _row(temperature=0.0, repetition_penalty=2.0, prompt=(0,), out=(3, 3))
    # token 0 (seen in the prompt): 2.0 / 2 = 1.0 < 1.9 -> argmax moves to token 1
    assert _sample([row], logits).token_b[0] == 1
    row = _row(temperature=0.0, frequency_penalty=0.6, out=(0, 0))
    assert _sample([row], logits).token_b[0] == 1  # 2.0 - 1.2 = 0.8 < 1.9
    row = _row(temperature=0.0, presence_penalty=0.05, out=(0, 0, 0))
    assert _sample([row], logits).token_b[0] == 0  # 2.0 - 0.05 = 1.95 > 1.9: counted once
    row = _row(temperature=0.0, presence_penalty=0.2, out=(1,))
    assert _sample([row], logits).token_b[0] == 0


def test_logprobs_are_the_model_log_softmax(logits_bv):
    out = _sample([_row(temperature=0.0, logprobs=3)] * 4, logits_bv)
    ref = jax.nn.log_softmax(jnp.asarray(logits_bv), axis=-1)
    np.testing.assert_allclose(out.logprob_b, ref.max(-1), rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids_bk, np.argsort(-logits_bv, axis=-1)[:, :3])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("n", 0),
        ("top_k", -2),
        ("min_p", 2.0),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("logprobs", -1),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=3)
