"""Incremental detokenisation: split UTF-8, stop strings across tokens, stable deltas."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ligerjax.engine.detokenizer import IncrementalDetokenizer


def _byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def _stream(detok, ids):
    out = "".join(detok.add_tokens([t]) for t in ids if detok.stop_reason is None)
    return out + detok.flush()


def test_multibyte_characters_split_across_tokens_are_never_emitted_broken():
    ids = list("héllo → wörld".encode())
    detok = IncrementalDetokenizer(_byte_decode)
    deltas = [detok.add_tokens([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "héllo → wörld"


def test_stop_string_straddling_tokens_is_cut_and_never_streamed():
    words = ["Hel", "lo", " wor", "ld", "!", " bye"]
    detok = IncrementalDetokenizer(lambda ids: "".join(words[i] for i in ids), stop=["world!"])
    assert _stream(detok, range(len(words))) == "Hello "
    assert detok.stop_reason == "world!" and detok.text == "Hello "


def test_stop_string_included_when_asked():
    detok = IncrementalDetokenizer(_byte_decode, stop=["lo"], include_stop_str_in_output=True)
    assert _stream(detok, list(b"hello there")) == "hello"


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=3), max_size=3))
def test_streamed_deltas_add_up_to_the_final_text(text, stops):
    detok = IncrementalDetokenizer(_byte_decode, stop=stops)
    streamed = _stream(detok, list(text.encode()))
    assert streamed == detok.text
    if detok.stop_reason is None:
        assert detok.text == text
    else:
        assert text.startswith(detok.text) and detok.stop_reason in text
