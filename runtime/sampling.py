"""Next-token choice on the host: greedy at temperature 0, else temperature, top-k and top-p sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mindvl.errors import RequestError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None

    def __post_init__(self) -> None:
        # Written so that NaN fails every check.
        if not 0 <= self.temperature < math.inf or not 0 < self.top_p <= 1 or not self.top_k >= 0:
            raise RequestError(f"sampling settings temperature={self.temperature}, top_p={self.top_p}, "
                               f"top_k={self.top_k} are invalid: use a finite temperature >= 0, 0 < top_p <= 1, "
                               f"top_k >= 0")


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from the logits [vocab] of the last position."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if sampling.top_p < 1:
        # The smallest prefix of the sorted tokens whose mass reaches top_p (at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
