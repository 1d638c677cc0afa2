"""Next-token choice on the host: greedy at temperature 0, else temperature, top-k and top-p sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mindvl.errors import RequestError

MAX_SEED = 2**64 - 1  # numpy seeds take any non-negative integer; a bound keeps a seed a seed, not a bignum


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
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise RequestError(f"seed={self.seed} is invalid: use an integer from 0 to {MAX_SEED}, or no seed")


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from the logits [vocab] of the last position."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    # Shifted by the maximum before dividing: every scaled logit is <= 0, so however small the temperature the
    # division never overflows to inf - inf = NaN; it only underflows the unlikely tokens to probability 0.
    with np.errstate(over="ignore"):
        scaled = (logits.astype(np.float64) - np.max(logits)) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(scaled[order])
    probs /= probs.sum()
    if sampling.top_p < 1:
        # The smallest prefix of the sorted tokens whose mass reaches top_p (at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
