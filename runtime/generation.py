"""One sequence being generated, and the prompt it starts from: what a `Batch` row runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import numpy as np

from mindvl.runtime.detokenize import StreamDecoder
from mindvl.runtime.sampling import Sampling, next_token


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the text graphs: token embeddings with the visual tokens placed, and M-RoPE positions."""

    embeds: np.ndarray  # [L, hidden]; the rows of a reused prefix may be left unset: they are never fed
    position_ids: np.ndarray  # [3, L]
    rope_delta: int  # a generated token's position is its cache slot + rope_delta
    keys: np.ndarray  # [L] what each position holds (`shapes.text_inputs.content_keys`), for prefix reuse
    vision_graphs: list[str] = field(default_factory=list)
    vision_cache_hits: int = 0

    @property
    def length(self) -> int:
        return len(self.embeds)


class Generation:
    """One sequence being generated: its prompt, sampling state, tokens so far and text; `finish` is set when
    it ends, with `error` when it failed."""

    def __init__(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling, decoder: StreamDecoder,
                 stop_ids: Collection[int], keep_logits: bool = False) -> None:
        self.prompt, self.max_new_tokens, self.sampling = prompt, max_new_tokens, sampling
        self.decoder, self.stop_ids, self.keep_logits = decoder, stop_ids, keep_logits
        self.rng = np.random.default_rng(sampling.seed)
        self.token_ids: list[int] = []
        self.logits: list[np.ndarray] = []
        self.fill = 0  # cache slots holding this sequence
        self.start = 0  # prompt tokens its row held already (a reused prefix), set when it joins a batch
        self.chunks, self.prefill_ms, self.prefill_graphs = 0, 0.0, []  # its prefill calls
        self.decode_ms: list[float] = []  # each of its decode steps' time
        self.finish: str | None = None  # "stop" (an end token) | "length" (max_new_tokens reached) | "error"
        self.error: Exception | None = None

    @property
    def text(self) -> str:
        return self.decoder.emitted

    @property
    def cache_needed(self) -> int:
        return self.prompt.length + self.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self.fill < self.prompt.length

    def content(self) -> np.ndarray:
        """The keys of what its cache slots [0, fill) hold: the prompt, then the tokens fed back so far."""
        return np.concatenate([self.prompt.keys, np.asarray(self.token_ids, np.int64)])[: self.fill]

    def take(self, logits: np.ndarray) -> str:
        """Choose the next token from the logits [vocab]; the new text it completes (possibly "")."""
        token = next_token(logits, self.sampling, self.rng)
        self.token_ids.append(token)
        if self.keep_logits:
            self.logits.append(logits)
        if token in self.stop_ids:
            self.finish = "stop"
            return self.decoder.flush()
        piece = self.decoder.push(token)
        if len(self.token_ids) == self.max_new_tokens:
            self.finish = "length"
            piece += self.decoder.flush()
        return piece

    def fail(self, error: Exception) -> None:
        self.finish, self.error = "error", error
