"""Tensor parallelism's layout: what one of `tp` ranks holds of the decoder (Megatron's column / row split).

    attention   query heads split evenly; key-value heads too when `tp` divides them, else each rank holds the one
                kv head its query heads read (replicated over the tp / kv ranks that share it)
    MLP         gate and up split by hidden units (columns), down by rows; an all-reduce sums the ranks' parts of
                o_proj and down (Qwen2 has no bias after either, so nothing is added twice)
    LM head     split by vocabulary rows: each rank returns its slice of the logits and the driver joins them on
                the host, which costs no collective and keeps 1/tp of the largest matrix per rank
    embedding   host-side in the driver, as on one card (prompts are embedded in numpy): on no rank
    vision      whole, on rank 0 only (README, "Tensor parallelism")

One graph file per bucket serves every rank: the rank only decides which slice of each weight it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindvl.errors import MindVLError
from mindvl.shapes.config import TextConfig


class ParallelError(MindVLError):
    """A tensor-parallel degree the model's dimensions do not allow."""


@dataclass(frozen=True)
class TextShard:
    """One rank's share of the decoder's dimensions at degree `tp` (tp=1: the whole decoder)."""
    tp: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_groups(self) -> int:
        return self.heads // self.kv_heads


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def text_shard(t: TextConfig, tp: int) -> TextShard:
    """The shard of every rank at degree `tp`, or a ParallelError naming the dimension that does not split."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ParallelError(f"tp: {tp!r} must be a positive integer (1: one card)")
    heads, kv = t.num_attention_heads, t.num_key_value_heads
    for what, size in (("num_attention_heads", heads), ("intermediate_size", t.intermediate_size),
                       ("vocab_size", t.vocab_size)):
        if size % tp:
            raise ParallelError(f"{what} {size} does not divide by tp {tp}: use a tp that divides it "
                                f"({_divisors(size)})")
    if kv % tp and tp % kv:
        raise ParallelError(f"num_key_value_heads {kv} and tp {tp}: one must divide the other (kv heads are split, "
                            f"or replicated when fewer than tp); use tp in {_divisors(heads)} that does")
    return TextShard(tp, heads // tp, max(1, kv // tp), t.intermediate_size // tp, t.vocab_size // tp)


def rank_slice(full: tuple[int, ...], local: tuple[int, ...], rank: int, tp: int) -> tuple[slice, ...]:
    """Where rank `rank`'s `local` block sits in a weight of shape `full`: along the one axis the two differ, the
    block that holds the rank's proportional position (rank × full / tp), aligned to the block size. For split
    weights that is block `rank`; for kv heads replicated over tp / kv ranks, the kv head those ranks share."""
    index = []
    for size, part in zip(full, local, strict=True):
        start = (rank * size // tp) // part * part
        index.append(slice(start, start + part))
    return tuple(index)
