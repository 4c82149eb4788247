"""check_stop: every token-level stop condition, and min_tokens holding them off."""

from __future__ import annotations

import pytest

from ligerjax.engine.request import Request, RequestStatus
from ligerjax.engine.stop_checker import check_stop
from ligerjax.sampling_params import SamplingParams

EOS = 2
STOPPED, LENGTH = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH


def after(outputs: list[int], prompt_len: int = 3, **params) -> Request:
    r = Request("r", list(range(10, 10 + prompt_len)), SamplingParams(**params), eos_token_id=EOS)
    for t in outputs:
        r.append_output(t)
    return r


@pytest.mark.parametrize(
    ("outputs", "params", "expected"),
    [
        ([5], {}, None),
        ([5, EOS], {}, (STOPPED, None)),
        ([5, EOS], {"ignore_eos": True}, None),
        ([5, 9], {"stop_token_ids": (9, 11)}, (STOPPED, 9)),
        ([5, 6], {"max_tokens": 2}, (LENGTH, None)),
        ([5, EOS], {"max_tokens": 2}, (STOPPED, None)),  # a stop token outranks the length
        ([EOS], {"min_tokens": 2}, None),
        ([9], {"min_tokens": 2, "stop_token_ids": (9,)}, None),
        ([5, EOS], {"min_tokens": 2}, (STOPPED, None)),
        ([EOS], {"min_tokens": 1, "max_tokens": 1}, (STOPPED, None)),
        ([5], {"min_tokens": 1, "max_tokens": 1}, (LENGTH, None)),
        ([5] * 20, {"max_tokens": None}, None),
    ],
)
def test_token_stop_conditions(outputs, params, expected):
    assert check_stop(after(outputs, **params), max_model_len=100) == expected


def test_max_model_len_stops_even_below_min_tokens():
    r = after([5, 6], prompt_len=6, min_tokens=5, max_tokens=None)
    assert check_stop(r, max_model_len=8) == (LENGTH, None)
    assert check_stop(r, max_model_len=9) is None


def test_no_eos_token_means_no_eos_stop():
    r = Request("r", [1], SamplingParams(), eos_token_id=None)
    r.append_output(EOS)
    assert check_stop(r, max_model_len=100) is None
