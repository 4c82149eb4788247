"""Incremental detokenisation and stop-string detection for one sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Decode = Callable[[Sequence[int]], str]

# Tokens decoded again on every step for context: enough for a multi-byte UTF-8 character
# split across byte-level BPE tokens, and for word-boundary spaces to come out right.
_CONTEXT_TOKENS = 6


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, emitting only stable characters.

    ``decode`` maps token ids to text (special tokens already skipped or kept by the caller).
    Text is emitted once the tail no longer ends in a partial UTF-8 character (U+FFFD), and,
    when there are stop strings, once no stop string can still begin inside it. Invariant: the
    concatenation of everything returned by :meth:`add_tokens` and :meth:`flush` is a prefix
    of ``text`` that is never taken back.
    """

    decode: Decode
    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    stop_reason: str | None = None
    emitted: int = 0

    def _holdback(self) -> int:
        if not self.stop or self.stop_reason is not None:
            return 0
        return max(len(s) for s in self.stop) - 1

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return the text that became stable (stop strings cut off)."""
        self.token_ids.extend(new_ids)
        prefix_text = self.decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self.decode(self.token_ids[self.prefix_offset :])
        if not full_text.endswith("\ufffd") and len(full_text) > len(prefix_text):
            self.read_offset = len(self.token_ids)
            self.prefix_offset = max(self.read_offset - _CONTEXT_TOKENS, 0)
            self._append_checking_stop(full_text[len(prefix_text) :])
        return self._take(len(self.text) - self._holdback())

    def flush(self) -> str:
        """The text held back so far; call once the sequence has finished."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def _append_checking_stop(self, new_text: str) -> None:
        start = len(self.text)
        self.text += new_text
        if not self.stop:
            return
        # A stop string may straddle the old text and the new: search from just before `start`.
        window_start = max(0, start - max(len(s) for s in self.stop) + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.stop_reason = s
            self.text = (
                self.text[: i + len(s)] if self.include_stop_str_in_output else self.text[:i]
            )
