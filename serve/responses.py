"""OpenAI's response shapes (a completion, a stream chunk, usage), server-sent events, and stop strings."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Envelope:
    """What every response and chunk of one completion repeats."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                   cached_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
        """The extra last chunk `stream_options: {"include_usage": true}` asks for: no choices, only usage."""
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage, with the prompt tokens a cache held already (prefix reuse) as `cached_tokens`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


class StopText:
    """Cuts the text at the first stop string to complete. Text that could be the start of a stop string is held
    back until the next piece shows whether it is, so a streamed answer never shows part of a stop string.

    Each stop string is matched by a Knuth-Morris-Pratt automaton fed one character at a time, so a piece costs
    time linear in its length whatever the stop strings are; searching the held text anew for every piece would be
    quadratic in a stop string's length."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.matchers = [_Matcher(s) for s in stops]
        self.held, self.stopped = "", False

    def push(self, piece: str) -> str:
        """The text safe to send now; sets `stopped` when a stop string completed (nothing after it is sent)."""
        text = self.held + piece
        for end, char in enumerate(piece, len(self.held) + 1):
            done = [m.stop for m in self.matchers if m.feed(char)]
            if done:
                self.held, self.stopped = "", True
                return text[: end - len(max(done, key=len))]
        keep = max((m.matched for m in self.matchers), default=0)
        self.held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the answer ended without completing a stop string."""
        text, self.held = self.held, ""
        return text


class _Matcher:
    """How much of one stop string the text ends with, updated a character at a time."""

    def __init__(self, stop: str) -> None:
        self.stop, self.matched = stop, 0
        # fallback[i]: the longest proper prefix of stop[:i + 1] that is also its suffix.
        self.fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            k += stop[i] == stop[k]
            self.fallback[i] = k

    def feed(self, char: str) -> bool:
        """True when `char` completes the stop string."""
        while self.matched and char != self.stop[self.matched]:
            self.matched = self.fallback[self.matched - 1]
        self.matched += char == self.stop[self.matched]
        if self.matched == len(self.stop):
            self.matched = self.fallback[-1]
            return True
        return False
