"""Static-shape continuous batching: up to B sequences decode together in the graphs and the KV cache of one
(batch B, cache C) bucket, each in its own row; a free row takes a new sequence at the next step.

    add(sequences)  prefill_b{B}_s{S}_c{C}: the new rows write slots 0..S-1, every other row idles ─▶ first tokens
    step()          decode_b{B}_c{C}: every active row writes its next slot, free rows idle        ─▶ next tokens

Row r's cache holds its sequence in slots [0, fill_r). A slot >= fill_r holds garbage that is overwritten before
any mask admits it, so an idling row points all its writes at slot fill_r (duplicates allowed), which its own next
step overwrites first, and its queries see only that slot: the working rows' caches are untouched and the idle
row's throw-away outputs stay finite. `Runtime.generate` is a batch of one.

One row's failure is its own: a row whose inputs cannot be built, or whose sampler fails, ends with `finish` =
"error" and its row is freed, while the others go on. A graph call that fails is tried again row by row (the rest
idle, as above), so a fault only one row triggers fails that row alone and every other row gets exactly the
logits the whole call would have given it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np

from mindvl.device import host_dtype
from mindvl.runtime.artifacts import Artifacts
from mindvl.runtime.detokenize import StreamDecoder
from mindvl.runtime.sampling import Sampling, next_token
from mindvl.shapes.buckets import choose_text_buckets
from mindvl.shapes.graphs import GraphSpec
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
    it ends, with `error` when it failed."""

    def __init__(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling, decoder: StreamDecoder,
                 stop_ids: Collection[int], keep_logits: bool = False) -> None:
        self.prompt, self.max_new_tokens, self.sampling = prompt, max_new_tokens, sampling
        self.decoder, self.stop_ids, self.keep_logits = decoder, stop_ids, keep_logits
        self.rng = np.random.default_rng(sampling.seed)
        self.token_ids: list[int] = []
        self.logits: list[np.ndarray] = []
        self.fill = 0  # cache slots holding this sequence
        self.finish: str | None = None  # "stop" (an end token) | "length" (max_new_tokens reached) | "error"
        self.error: Exception | None = None

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

    def fail(self, error: Exception) -> None:
        self.finish, self.error = "error", error


class Batch:
    """The rows of one (batch, cache) bucket; `add` and `step` return (generation, new text) per row that worked
    or failed, and free the rows of generations that ended."""

    def __init__(self, artifacts: Artifacts, size: int, capacity: int) -> None:
        self.artifacts, self.size, self.capacity = artifacts, size, capacity
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
        for r, g in zip(free, generations, strict=True):
            self.rows[r] = g  # fill stays 0 until its prefill succeeded: until then the row idles at slot 0

        def write(r: int, inputs: _Inputs) -> None:
            g = self.rows[r]
            n = g.prompt.length
            inputs.embeds[r, :n], inputs.positions[:, r, :n] = g.prompt.embeds, g.prompt.position_ids
            inputs.slots[r], inputs.key_valid[r] = np.arange(seq), np.arange(self.capacity) < n
            inputs.logits_index[r] = n - 1

        return self._call(seq, free, write, lambda g: setattr(g, "fill", g.prompt.length))

    def step(self) -> list[tuple[Generation, str]]:
        """One decode step of every active generation: each feeds its last token and takes the next."""
        def write(r: int, inputs: _Inputs) -> None:
            g = self.rows[r]
            inputs.embeds[r, 0] = self.artifacts.embed[g.token_ids[-1]]
            inputs.positions[:, r, 0], inputs.slots[r, 0] = g.fill + g.prompt.rope_delta, g.fill
            inputs.key_valid[r] = np.arange(self.capacity) <= g.fill

        def written(g: Generation) -> None:
            g.fill += 1

        return self._call(1, [r for r, g in enumerate(self.rows) if g is not None], write, written)

    def _prefill_length(self, prompt_length: int) -> int:
        return choose_text_buckets(prompt_length, 0, self.artifacts.buckets, self.size, cache=self.capacity).prefill

    def _spec(self, seq: int) -> GraphSpec:
        if seq not in self._specs:
            kind = "decode" if seq == 1 else "prefill"
            self._specs[seq] = self.artifacts.manifest.find(kind, batch=self.size, seq=seq, cache=self.capacity)
        return self._specs[seq]

    def _call(self, seq: int, rows: list[int], write: Callable[[int, _Inputs], None],
              written: Callable[[Generation], None]) -> list[tuple[Generation, str]]:
        """Run `rows` through the graph of length `seq` (`write` puts a row's inputs in place, `written` records
        that its cache slots now hold it), then take each row's next token; a failure ends only its own row."""
        try:
            logits = self._run(seq, rows, write)
            done = {r: logits[r, -1] for r in rows}
            for r in rows:
                written(self.rows[r])
        except Exception:
            # Each row alone: a row that succeeds is recorded at once, so it idles past its new slots in the
            # calls that follow and they cannot overwrite what it just wrote.
            done = {}
            for r in rows:
                try:
                    done[r] = self._run(seq, [r], write)[r, -1]
                    written(self.rows[r])
                except Exception as e:
                    done[r] = e
        return [self._take(r, done[r]) for r in rows]

    def _run(self, seq: int, rows: list[int], write: Callable[[int, _Inputs], None]) -> np.ndarray:
        inputs = self._idle_inputs(seq)
        for r in rows:
            write(r, inputs)
        start = time.perf_counter()
        logits = self.artifacts.run(self._spec(seq), {
            "embeds": inputs.embeds, "position_ids": inputs.positions, "cache_positions": inputs.slots,
            "mask": attention_mask(inputs.key_valid, inputs.slots, self.np_dtype), "logits_index": inputs.logits_index})
        self.call_ms = (time.perf_counter() - start) * 1e3
        return logits

    def _idle_inputs(self, seq: int) -> _Inputs:
        """The inputs of a call in which every row idles: it writes to and sees only its slot `fill` (slot 0 when
        the row is free)."""
        inputs = _Inputs(embeds=np.zeros((self.size, seq, self.hidden), self.np_dtype),
                         positions=np.zeros((3, self.size, seq), np.int32),
                         slots=np.zeros((self.size, seq), np.int32),
                         key_valid=np.zeros((self.size, self.capacity), bool),
                         logits_index=np.zeros((self.size, 1), np.int32))
        for r, g in enumerate(self.rows):
            inputs.slots[r] = g.fill if g is not None else 0
            inputs.key_valid[r, inputs.slots[r, 0]] = True
        return inputs

    def _take(self, row: int, result: np.ndarray | Exception) -> tuple[Generation, str]:
        """The row's next token from its logits [vocab] (or the failure that left it without any)."""
        g, piece = self.rows[row], ""
        if isinstance(result, Exception):
            g.fail(result)
        else:
            try:
                piece = g.take(result)
            except Exception as e:  # the sampler or the detokeniser, on this row's values alone
                g.fail(e)
        if g.finish:
            self.rows[row] = None
        return g, piece


@dataclass
class _Inputs:
    """A text graph call's data inputs, [B, ...] each, built row by row."""

    embeds: np.ndarray  # [B, S, hidden]
    positions: np.ndarray  # [3, B, S]
    slots: np.ndarray  # [B, S] the cache slot each token writes
    key_valid: np.ndarray  # [B, C] slots that hold a real token once this call has written its own
    logits_index: np.ndarray  # [B, 1] the position whose logits are returned
