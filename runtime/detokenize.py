"""Streaming detokenisation: text pieces as tokens arrive, never splitting a multi-byte character."""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Decodes the whole sequence each time and emits what is new; a trailing replacement character means
    a character's bytes are still arriving, so that piece waits for the next token."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode, self.ids, self.emitted = decode, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith(REPLACEMENT) or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids)
        piece, self.emitted = text[len(self.emitted):] if text.startswith(self.emitted) else "", text
        return piece
