"""Static-shape continuous batching: up to B sequences run together in the graphs and the KV cache of one
(batch B, cache C) bucket, each in its own row; a free row takes a new sequence at the next step.

    add(generation)  takes the free row whose cache already holds the longest prefix of its prompt (no graph call)
    step()           1. prefill_b{B}_s{S}_c{C}, when rows are still prefilling: one chunk of each of them
                     2. decode_b{B}_c{C}, when rows are decoding: each writes its next slot     ─▶ next tokens

Row r's cache holds its sequence in slots [0, fill_r). A slot >= fill_r holds garbage that is overwritten before
any mask admits it, so an idling row points all its writes at slot fill_r (duplicates allowed), which its own next
write overwrites first, and its queries see only that slot: the working rows' caches are untouched and the idle
row's throw-away outputs stay finite. `Runtime.generate` is a batch of one.

Chunked prefill. A prompt longer than the largest prefill bucket is prefilled a chunk per step: each chunk writes
the slots after what the row holds and attends to all of them (`shapes.buckets.choose_text_buckets` picks the
call's length). Interleaving rule: a step runs at most one prefill call, then one decode step, so a row being
prefilled in chunks holds the decoding rows back by one chunk call per token at most.

Prefix reuse. A row keeps what its cache holds when its generation ends (`kept`); a new generation takes the free
row whose kept content shares the longest prefix with its prompt (its keys: token ids, and for images their
content), and prefills only the rest. Without `keep`, rows forget.

One row's failure is its own: a row whose inputs cannot be built, or whose sampler fails, ends with `finish` =
"error" and its row is freed, while the others go on. A graph call that fails is tried again row by row (the rest
idle, as above), so a fault only one row triggers fails that row alone and every other row gets exactly the
logits the whole call would have given it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mindvl.device import host_dtype
from mindvl.runtime.artifacts import Artifacts
from mindvl.runtime.generation import Generation
from mindvl.shapes.buckets import choose_text_buckets
from mindvl.shapes.graphs import GraphSpec
from mindvl.shapes.text_inputs import attention_mask, common_prefix

NOTHING = np.zeros(0, np.int64)


class Batch:
    """The rows of one cache set of a (batch, cache) bucket; `step` returns (generation, new text) per row that took
    a token or failed, and frees the rows of generations that ended."""

    def __init__(self, artifacts: Artifacts, size: int, capacity: int, cache_set: int = 0, keep: bool = False) -> None:
        self.artifacts, self.size, self.capacity, self.cache_set = artifacts, size, capacity, cache_set
        self.keep = keep
        self.rows: list[Generation | None] = [None] * size
        self.kept = [NOTHING] * size  # keys of what each free row's cache holds, for prefix reuse
        self.kept_prompt = [0] * size  # how much of that was the prompt of the generation that wrote it
        self.used = [0.0] * size  # when each row last took a generation: the least recently used is reused first
        self.np_dtype = host_dtype(artifacts.dtype)
        self.hidden = artifacts.config.text.hidden_size
        self.call_ms = 0.0  # the last graph call's time
        self.prefill_calls = self.decode_calls = self.decoded_rows = 0  # counts, for metrics
        self._specs: dict[int, GraphSpec] = {}  # by sequence length: looked up once, not every decode step

    @property
    def active(self) -> list[Generation]:
        return [g for g in self.rows if g is not None]

    @property
    def free(self) -> int:
        return self.rows.count(None)

    @property
    def decode_graph(self) -> str:
        return self._spec(1).name

    def reusable(self, keys: np.ndarray) -> int:
        """How many leading tokens of a prompt with these keys `add` would find in its row (at most all but the
        last, whose logits the prefill must give)."""
        return self._match(self._row_for(keys), keys)

    def worth_taking(self, keys: np.ndarray) -> int:
        """The longest prefix of a prompt with these keys that a free row holds, counting only rows it is worth
        overwriting for (`_worth`); 0 when no row is."""
        return max((self._worth(r, keys) for r, g in enumerate(self.rows) if g is None), default=0)

    @property
    def blank(self) -> bool:
        """Whether a free row keeps nothing: a new conversation can take it without overwriting another's."""
        return any(g is None and not len(k) for g, k in zip(self.rows, self.kept, strict=True))

    def add(self, generation: Generation) -> None:
        """Take the free row holding the longest prefix of the generation's prompt (the least recently used one when
        none holds any); its prefill starts after that prefix, at the next `step`."""
        if not self.free or generation.cache_needed > self.capacity:
            raise ValueError(f"a generation needing {generation.cache_needed} slots does not fit the {self.free} free "
                             f"rows of a {self.capacity}-slot cache")
        row = self._row_for(generation.prompt.keys)
        generation.start = generation.fill = self._match(row, generation.prompt.keys)
        self.rows[row], self.kept[row], self.used[row] = generation, NOTHING, time.monotonic()

    def remove(self, generation: Generation) -> None:
        """Free the row of a generation that is abandoned before it ended."""
        self._free(self.rows.index(generation))

    def prefill_length(self, remaining: int) -> int:
        """The length of a prefill call for rows with at most `remaining` prompt tokens left: all of them when a
        prefill bucket holds that many, else a chunk of the largest bucket."""
        return choose_text_buckets(remaining, 0, self.artifacts.buckets, self.size, cache=self.capacity).calls[0]

    def step(self) -> list[tuple[Generation, str]]:
        """One prefill call for the rows still prefilling, if any, then one decode step for the others."""
        prefilling = [r for r, g in enumerate(self.rows) if g is not None and g.prefilling]
        results = self._prefill(prefilling) if prefilling else []
        decoding = [r for r, g in enumerate(self.rows) if g is not None and not g.prefilling]
        return results + (self._decode(decoding) if decoding else [])

    def _prefill(self, rows: list[int]) -> list[tuple[Generation, str]]:
        """The next chunk of each row's prompt, in one call; a row whose prompt is then in takes its first token."""
        seq = self.prefill_length(max(self.rows[r].prompt.length - self.rows[r].fill for r in rows))
        chunks = {r: min(self.rows[r].prompt.length - self.rows[r].fill, seq) for r in rows}
        self.prefill_calls += 1

        def write(r: int, inputs: _Inputs) -> None:
            g, n = self.rows[r], chunks[r]
            a, prompt = g.fill, g.prompt
            inputs.embeds[r, :n], inputs.positions[:, r, :n] = prompt.embeds[a:a + n], prompt.position_ids[:, a:a + n]
            # Padding positions write the slot after the chunk: the next chunk or the first decode step overwrites it.
            inputs.slots[r], inputs.slots[r, :n] = a + n, np.arange(a, a + n)
            inputs.key_valid[r], inputs.logits_index[r] = np.arange(self.capacity) < a + n, n - 1

        def written(r: int) -> None:
            g = self.rows[r]
            g.fill, g.chunks, g.prefill_ms = g.fill + chunks[r], g.chunks + 1, g.prefill_ms + self.call_ms
            g.prefill_graphs.append(self._spec(seq).name)

        done = self._call(seq, rows, write, written)
        return [self._take(r, done[r]) for r in rows if isinstance(done[r], Exception) or not self.rows[r].prefilling]

    def _decode(self, rows: list[int]) -> list[tuple[Generation, str]]:
        """One decode step of these rows: each feeds its last token and takes the next."""
        def write(r: int, inputs: _Inputs) -> None:
            g = self.rows[r]
            inputs.embeds[r, 0] = self.artifacts.embed[g.token_ids[-1]]
            inputs.positions[:, r, 0], inputs.slots[r, 0] = g.fill + g.prompt.rope_delta, g.fill
            inputs.key_valid[r] = np.arange(self.capacity) <= g.fill

        def written(r: int) -> None:
            self.rows[r].fill += 1
            self.rows[r].decode_ms.append(self.call_ms)

        self.decode_calls, self.decoded_rows = self.decode_calls + 1, self.decoded_rows + len(rows)
        done = self._call(1, rows, write, written)
        return [self._take(r, done[r]) for r in rows]

    def _row_for(self, keys: np.ndarray) -> int:
        """The free row a prompt with these keys takes: the one worth taking with the longest prefix; else one that
        keeps nothing (another conversation's history stays); else the one holding the longest prefix; the least
        recently used among equals."""
        free = [r for r, g in enumerate(self.rows) if g is None]
        return max(free, key=lambda r: (self._worth(r, keys), not len(self.kept[r]), self._match(r, keys),
                                        -self.used[r]))

    def _worth(self, row: int, keys: np.ndarray) -> int:
        """The prefix of a prompt with these keys that `row` holds, if it is worth overwriting the row for: the
        prompt goes on from the whole prompt the row last served (the next turn of its chat, or the same prompt
        again), or it reuses at least as much as it overwrites (an earlier turn edited); else 0 — a request that
        merely shares a start with another conversation leaves that conversation's history alone."""
        match = self._match(row, keys)
        goes_on = min(self.kept_prompt[row], len(keys) - 1) <= match
        return match if match and (goes_on or match >= len(self.kept[row]) - match) else 0

    def _match(self, row: int, keys: np.ndarray) -> int:
        return min(common_prefix(self.kept[row], keys), len(keys) - 1) if self.keep else 0

    def _spec(self, seq: int) -> GraphSpec:
        if seq not in self._specs:
            kind = "decode" if seq == 1 else "prefill"
            self._specs[seq] = self.artifacts.manifest.find(kind, batch=self.size, seq=seq, cache=self.capacity)
        return self._specs[seq]

    def _call(self, seq: int, rows: list[int], write: Callable[[int, _Inputs], None],
              written: Callable[[int], None]) -> dict[int, np.ndarray | Exception]:
        """Each row's last logits [vocab] of one call of the graph of length `seq` (`write` puts a row's inputs in
        place, `written` records that its cache slots now hold them), or the failure that is that row's alone."""
        try:
            logits = self._run(seq, rows, write)
            for r in rows:
                written(r)
            return {r: logits[r, -1] for r in rows}
        except Exception:
            # Each row alone: a row that succeeds is recorded at once, so it idles past its new slots in the
            # calls that follow and they cannot overwrite what it just wrote.
            done: dict[int, np.ndarray | Exception] = {}
            for r in rows:
                try:
                    done[r] = self._run(seq, [r], write)[r, -1]
                    written(r)
                except Exception as e:
                    done[r] = e
            return done

    def _run(self, seq: int, rows: list[int], write: Callable[[int, _Inputs], None]) -> np.ndarray:
        inputs = self._idle_inputs(seq)
        for r in rows:
            write(r, inputs)
        start = time.perf_counter()
        logits = self.artifacts.run(self._spec(seq), {
            "embeds": inputs.embeds, "position_ids": inputs.positions, "cache_positions": inputs.slots,
            "mask": attention_mask(inputs.key_valid, inputs.slots, self.np_dtype), "logits_index": inputs.logits_index},
            self.cache_set)
        self.call_ms = (time.perf_counter() - start) * 1e3
        return logits

    def _idle_inputs(self, seq: int) -> _Inputs:
        """The inputs of a call in which every row idles: it writes to and sees only its first slot past what it
        holds (`fill`, or for a free row the end of what it keeps)."""
        inputs = _Inputs(embeds=np.zeros((self.size, seq, self.hidden), self.np_dtype),
                         positions=np.zeros((3, self.size, seq), np.int32),
                         slots=np.zeros((self.size, seq), np.int32),
                         key_valid=np.zeros((self.size, self.capacity), bool),
                         logits_index=np.zeros((self.size, 1), np.int32))
        for r, g in enumerate(self.rows):
            inputs.slots[r] = g.fill if g is not None else len(self.kept[r])
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
            self._free(row)
        return g, piece

    def _free(self, row: int) -> None:
        g = self.rows[row]
        # A failed row's slots are in an unknown state: it keeps nothing.
        self.kept[row] = g.content() if self.keep and g.error is None else NOTHING
        self.kept_prompt[row] = min(g.prompt.length, len(self.kept[row]))
        self.rows[row] = None


@dataclass
class _Inputs:
    """A text graph call's data inputs, [B, ...] each, built row by row."""

    embeds: np.ndarray  # [B, S, hidden]
    positions: np.ndarray  # [3, B, S]
    slots: np.ndarray  # [B, S] the cache slot each token writes
    key_valid: np.ndarray  # [B, C] slots that hold a real token once this call has written its own
    logits_index: np.ndarray  # [B, 1] the position whose logits are returned
