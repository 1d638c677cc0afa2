"""Where kept KV lives: each (batch, cache) bucket's cache sets, each one a `Batch` whose rows keep what their cache
holds when their generation ends, so that a request starting the same way (the next turn of a chat, a shared system
prompt) prefills only the rest.

Bounded by bytes: a bucket gets another cache set only while all sets together stay within the ceiling; past it,
the set used least recently is taken, and its rows' kept prefixes are overwritten as new generations take them.
Ceiling 0: one set per bucket whose rows keep nothing — no reuse, as without a pool.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mindvl.runtime.artifacts import Artifacts
from mindvl.runtime.batch import Batch
from mindvl.shapes.graphs import dtype_bytes


class KVPool:
    def __init__(self, artifacts: Artifacts, ceiling_bytes: int) -> None:
        self.artifacts, self.ceiling_bytes = artifacts, ceiling_bytes
        self.sets: dict[tuple[int, int], list[Batch]] = {}
        self.bytes = 0  # of every cache set allocated

    def batch(self, size: int, capacities: Sequence[int], keys: Sequence[np.ndarray]) -> Batch:
        """The cache set to run at batch `size` for requests whose prompts have `keys` (the first ones to join), of
        the caches `capacities` (each fits them; the preferred one first). Every set it returns is idle: the caller
        runs one batch at a time.

          1. a set with a row worth taking for one of the prompts (`Batch.worth_taking`: the next turn of its chat,
             or an edited one that reuses at least as much as it overwrites): the longest prefix;
          2. else, in the preferred cache, a set with a row that keeps nothing, or a new set while the ceiling
             allows: a new conversation does not overwrite another's (a shared start alone is not worth it);
          3. else the set holding the longest prefix of one of the prompts, the least recently used among equals.
        """
        held = [(i, b) for i, c in enumerate(capacities) for b in self.sets.get((size, c), [])]
        going_on = [(max(b.worth_taking(k) for k in keys), -i, b) for i, b in held]
        best = max(going_on, key=lambda g: (g[0], g[1], -_last_use(g[2])), default=None)
        if best is not None and best[0] > 0:
            return best[2]
        home = self.sets.setdefault((size, capacities[0]), [])
        blank = [b for b in home if b.blank]
        if blank:
            return blank[0]
        if not home or self.bytes + self._set_bytes(size, capacities[0]) <= self.ceiling_bytes:
            return self._new_set(size, capacities[0])
        return max((b for _, b in held), key=lambda b: (max(b.reusable(k) for k in keys), -_last_use(b)))

    def _new_set(self, size: int, capacity: int) -> Batch:
        sets = self.sets.setdefault((size, capacity), [])
        batch = Batch(self.artifacts, size, capacity, cache_set=len(sets), keep=self.ceiling_bytes > 0)
        sets.append(batch)
        self.bytes += self._set_bytes(size, capacity)
        return batch

    def _set_bytes(self, size: int, capacity: int) -> int:
        caches = self.artifacts.manifest.find("decode", batch=size, seq=1, cache=capacity).caches
        return sum(math.prod(c.shape) * dtype_bytes(c.dtype) for c in caches)


def _last_use(batch: Batch) -> float:
    return max(batch.used)

