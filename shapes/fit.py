"""The fit rule: which bucket an image (or a video's frames) takes, and what that costs in tokens. One rule for the
runtime, `mindvl serve` and `mindvl plan`, which chooses buckets to minimise exactly what this rule minimises.

An image of h x w pixels has a native size (h', w') = smart_resize(h, w, factor, min_pixels, max_pixels): what the
model's own processor makes of it, with the model's own pixel limits. It carries N = h'w' / factor² tokens. A bucket
of H x W pixels computes T = HW / factor² tokens. Resized into the bucket, the image is stretched by
r = (H/W) / (h/w); the part of the bucket that holds the image at its own aspect ratio is T / max(r, 1/r) tokens, so

    kept  = min(N, T / max(r, 1/r))   the image's tokens the bucket holds
    waste = T - kept                  tokens computed that carry nothing the image has (upscaling, stretching)
    lost  = N - kept                  tokens of the native image that the bucket cannot hold

A bucket is admissible when kept >= floor × N (the fidelity floor, `FIDELITY_FLOOR` unless the bucket spec says
otherwise). The image takes the admissible bucket with the least waste + lost, then the fewest pixels, then the
name; when no bucket is admissible, the one that keeps the most (as close to the floor as the artifact allows).
All arithmetic is exact (fractions): the same image and buckets always give the same bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence, TypeVar

# Half the native tokens is about 0.71 x the native resolution on each side: README.md, "Buckets", says why.
FIDELITY_FLOOR = 0.5


@dataclass(frozen=True)
class Fit:
    """An image of `source` pixels (native size `native`) resized into a bucket of `size` pixels."""

    size: tuple[int, int]  # the bucket's (H, W)
    source: tuple[int, int]
    native: tuple[int, int]
    factor: int  # pixels per token side: patch size x merge size

    @property
    def tokens(self) -> int:
        return self.size[0] * self.size[1] // self.factor**2

    @property
    def native_tokens(self) -> int:
        return self.native[0] * self.native[1] // self.factor**2

    @property
    def stretch(self) -> Fraction:
        """max(r, 1/r) >= 1: how much the bucket distorts the image's aspect ratio (1: not at all)."""
        r = Fraction(self.size[0] * self.source[1], self.size[1] * self.source[0])
        return max(r, 1 / r)

    @property
    def kept(self) -> Fraction:
        return min(Fraction(self.native_tokens), self.tokens / self.stretch)

    @property
    def waste(self) -> Fraction:
        return self.tokens - self.kept

    @property
    def lost(self) -> Fraction:
        return self.native_tokens - self.kept

    def admissible(self, floor: float) -> bool:
        return self.kept >= Fraction(floor) * self.native_tokens


Bucket = TypeVar("Bucket")  # an ImageBucket or VideoBucket: anything with height, width and name


def rule_key(fit: Fit, floor: float) -> tuple:
    """The rule's order of buckets for one image: the lowest key is taken (ties: fewer pixels, then the name)."""
    score = (fit.waste + fit.lost,) if fit.admissible(floor) else (-fit.kept,)
    return (not fit.admissible(floor), *score, fit.size[0] * fit.size[1], f"{fit.size[0]}x{fit.size[1]}")


def best_fit(buckets: Sequence[Bucket], source: tuple[int, int], native: tuple[int, int], factor: int,
             floor: float) -> tuple[Bucket, Fit]:
    """The bucket the rule of the module docstring gives an image of `source` pixels, and its fit."""
    bucket = min(buckets, key=lambda b: rule_key(Fit((b.height, b.width), source, native, factor), floor))
    return bucket, Fit((bucket.height, bucket.width), source, native, factor)
