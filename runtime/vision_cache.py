"""Visual tokens already computed, kept for the next request that shows the same image or video at the same bucket
(a chat turn resends the whole history, images included): bounded by bytes, the least recently used out first;
a limit of 0 keeps nothing."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class VisionCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def get(self, graph: str, digest: str) -> np.ndarray | None:
        """The visual tokens `graph` made of the input whose digest is `digest`, if kept."""
        features = self._entries.get((graph, digest))
        if features is not None:
            self._entries.move_to_end((graph, digest))
        return features

    def put(self, graph: str, digest: str, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes or (graph, digest) in self._entries:
            return
        self._entries[graph, digest] = features
        self.bytes += features.nbytes
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
