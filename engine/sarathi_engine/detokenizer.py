"""Turning output tokens into text as they arrive, and stop strings.

Text is decoded over a short window that starts a few tokens back, so tokens that only make
sense with their neighbour (leading spaces, multi-byte characters) come out right; an incomplete
character (U+FFFD at the end) waits for the next token.
"""
from __future__ import annotations

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)


def find_stop(text: str, new_len: int, stops: list[str]) -> int:
    """Index in text where the earliest stop string begins, searching only where the last
    new_len characters could complete one; -1 when none does."""
    best = -1
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best == -1 or at < best):
            best = at
    return best
