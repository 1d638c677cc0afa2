"""Static-shape continuous batching: up to B sequences decode together in the graphs and the KV cache of one
(batch B, cache C) bucket, each in its own row; a free row takes a new sequence at the next step.

    add(sequences)  prefill_b{B}_s{S}_c{C}: the new rows write slots 0..S-1, every other row idles ─▶ first tokens
    step()          decode_b{B}_c{C}: every active row writes its next slot, free rows idle        ─▶ next tokens

Row r's cache holds its sequence in slots [0, fill_r). A slot >= fill_r holds garbage that is overwritten before
any mask admits it, so an idling row points all its writes at slot fill_r (duplicates allowed), which its own next
step overwrites first, and its queries see only that slot: the working rows' caches are untouched and the idle
row's throw-away outputs stay finite. `Runtime.generate` is a batch of one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np

from mindvl.device import host_dtype
from mindvl.runtime.artifacts import Artifacts
from mindvl.runtime.detokenize import StreamDecoder
from mindvl.runtime.sampling import Sampling, next_token
from mindvl.shapes.graphs import GraphSpec, text_graph
from mindvl.shapes.text_inputs import attention_mask


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the text graphs: token embeddings with the visual tokens placed, and M-RoPE positions."""

    embeds: np.ndarray  # [L, hidden]
    position_ids: np.ndarray  # [3, L]
    rope_delta: int  # a generated token's position is its cache slot + rope_delta
    vision_graphs: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.embeds)


class Generation:
    """One sequence being generated: its prompt, sampling state, tokens so far and text; `finish` is set when
    it ends."""

    def __init__(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling, decoder: StreamDecoder,
                 stop_ids: Collection[int], keep_logits: bool = False) -> None:
        self.prompt, self.max_new_tokens, self.sampling = prompt, max_new_tokens, sampling
        self.decoder, self.stop_ids, self.keep_logits = decoder, stop_ids, keep_logits
        self.rng = np.random.default_rng(sampling.seed)
        self.token_ids: list[int] = []
        self.logits: list[np.ndarray] = []
        self.fill = 0  # cache slots holding this sequence
        self.finish: str | None = None  # "stop" (an end token) | "length" (max_new_tokens reached)

    @property
    def text(self) -> str:
        return self.decoder.emitted

    @property
    def cache_needed(self) -> int:
        return self.prompt.length + self.max_new_tokens

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


class Batch:
    """The rows of one (batch, cache) bucket; `add` and `step` return (generation, new text) per row that worked,
    and free the rows of generations that ended."""

    def __init__(self, artifacts: Artifacts, size: int, capacity: int, prefill_lengths: Sequence[int]) -> None:
        self.artifacts, self.size, self.capacity = artifacts, size, capacity
        self.prefill_lengths = sorted(s for s in prefill_lengths if s <= capacity)
        self.rows: list[Generation | None] = [None] * size
        self.np_dtype = host_dtype(artifacts.dtype)
        self.hidden = artifacts.config.text.hidden_size
        self.call_ms = 0.0  # the last graph call's time
        self._specs: dict[int, GraphSpec] = {}  # by sequence length: built once, not every decode step

    @property
    def active(self) -> list[Generation]:
        return [g for g in self.rows if g is not None]

    @property
    def free(self) -> int:
        return self.rows.count(None)

    def graph_names(self, prompt_length: int) -> tuple[str, str]:
        """The prefill and decode graphs a prompt of this length goes through."""
        return self._spec(self._prefill_length(prompt_length)).name, self._spec(1).name

    def remove(self, generation: Generation) -> None:
        """Free the row of a generation that is abandoned before it ended."""
        self.rows[self.rows.index(generation)] = None

    def add(self, generations: Sequence[Generation]) -> list[tuple[Generation, str]]:
        """Prefill new generations into free rows, all in one call, and take each one's first token."""
        free = [r for r, g in enumerate(self.rows) if g is None][: len(generations)]
        if len(free) < len(generations) or any(g.cache_needed > self.capacity for g in generations):
            raise ValueError(f"{len(generations)} generations do not fit the {self.free} free rows of a "
                             f"{self.capacity}-slot cache")
        seq = self._prefill_length(max(g.prompt.length for g in generations))
        embeds, positions, slots, key_valid = self._idle_inputs(seq)
        logits_index = np.zeros((self.size, 1), np.int32)
        for r, g in zip(free, generations):
            n = g.prompt.length
            embeds[r, :n], positions[:, r, :n] = g.prompt.embeds, g.prompt.position_ids
            slots[r], key_valid[r], logits_index[r] = np.arange(seq), np.arange(self.capacity) < n, n - 1
            self.rows[r], g.fill = g, n
        logits = self._run(seq, embeds, positions, slots, key_valid, logits_index)
        return [self._take(r, logits) for r in free]

    def step(self) -> list[tuple[Generation, str]]:
        """One decode step of every active generation: each feeds its last token and takes the next."""
        embeds, positions, slots, key_valid = self._idle_inputs(1)
        active = [r for r, g in enumerate(self.rows) if g is not None]
        for r in active:
            g = self.rows[r]
            embeds[r, 0] = self.artifacts.embed[g.token_ids[-1]]
            positions[:, r, 0], slots[r, 0] = g.fill + g.prompt.rope_delta, g.fill
            key_valid[r, : g.fill + 1] = True
            g.fill += 1
        logits = self._run(1, embeds, positions, slots, key_valid, np.zeros((self.size, 1), np.int32))
        return [self._take(r, logits) for r in active]

    def _prefill_length(self, prompt_length: int) -> int:
        return min(s for s in self.prefill_lengths if s >= prompt_length)

    def _spec(self, seq: int) -> GraphSpec:
        if seq not in self._specs:
            self._specs[seq] = text_graph(self.artifacts.config, self.size, seq, self.capacity, self.artifacts.dtype)
        return self._specs[seq]

    def _idle_inputs(self, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(embeds, position_ids, cache_positions, key_valid) of a call in which every row idles: it writes to
        and sees only its slot `fill` (slot 0 when the row is free)."""
        embeds = np.zeros((self.size, seq, self.hidden), self.np_dtype)
        positions = np.zeros((3, self.size, seq), np.int32)
        slots = np.zeros((self.size, seq), np.int32)
        key_valid = np.zeros((self.size, self.capacity), bool)
        for r, g in enumerate(self.rows):
            slots[r] = g.fill if g is not None else 0
            key_valid[r, slots[r, 0]] = True
        return embeds, positions, slots, key_valid

    def _run(self, seq: int, embeds: np.ndarray, positions: np.ndarray, slots: np.ndarray, key_valid: np.ndarray,
             logits_index: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = self.artifacts.run(self._spec(seq), {"embeds": embeds, "position_ids": positions, "cache_positions": slots,
                                           "mask": attention_mask(key_valid, slots, self.np_dtype),
                                           "logits_index": logits_index})
        self.call_ms = (time.perf_counter() - start) * 1e3
        return logits

    def _take(self, row: int, logits: np.ndarray) -> tuple[Generation, str]:
        g = self.rows[row]
        piece = g.take(logits[row, -1])
        if g.finish:
            self.rows[row] = None
        return g, piece
