"""What a bucket costs, in floating-point operations from the model config: the planner's one unit, so that a wasted
visual token, a padded prompt token and an unused cache slot can be weighed against each other.

Counted: every matmul of the vision encoder (patch embedding, blocks, merger; attention within an image), of the
decoder per token (projections, MLP) and its attention over the whole cache (the graphs attend to every slot, masked),
and the LM head once per prefill call and per decode step. Left out: norms, rotary, softmax — a few percent.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindvl.shapes.config import ModelConfig


@dataclass(frozen=True)
class CostModel:
    cfg: ModelConfig

    def vision_gflop(self, frames: int, height: int, width: int) -> float:
        """One image (frames=1) or video through its vision graph."""
        v = self.cfg.vision
        n = max(1, frames // v.temporal_patch_size) * (height // v.patch_size) * (width // v.patch_size)
        return (n * self._per_patch() + v.depth * 4 * n * n * v.embed_dim) / 1e9

    def visual_token_gflop(self) -> float:
        """What one merged visual token costs through the encoder (linear part) and the decoder."""
        return (self.cfg.vision.spatial_merge_size**2 * self._per_patch() + self._per_token()) / 1e9

    def text_gflop(self, tokens: int, cache: int) -> float:
        """`tokens` positions through the decoder, each attending over `cache` slots."""
        t = self.cfg.text
        attention = t.num_hidden_layers * 4 * cache * t.num_attention_heads * t.head_dim
        return tokens * (self._per_token() + attention) / 1e9

    def slot_gflop(self) -> float:
        """One more cache slot, for one position attending over it."""
        t = self.cfg.text
        return t.num_hidden_layers * 4 * t.num_attention_heads * t.head_dim / 1e9

    def head_gflop(self) -> float:
        t = self.cfg.text
        return 2 * t.hidden_size * t.vocab_size / 1e9

    def kv_bytes(self, batch: int, cache: int, dtype_bytes: int) -> int:
        t = self.cfg.text
        return 2 * t.num_hidden_layers * batch * cache * t.num_key_value_heads * t.head_dim * dtype_bytes

    def _per_patch(self) -> float:
        v = self.cfg.vision
        d, m, merged = v.embed_dim, v.mlp_dim, v.merged_dim
        merger = 2 * (merged * merged + merged * v.hidden_size) / v.spatial_merge_size**2
        return 2 * v.patch_dim * d + v.depth * 2 * (4 * d * d + 2 * d * m) + merger

    def _per_token(self) -> float:
        t = self.cfg.text
        h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
        return t.num_hidden_layers * 2 * (2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size)
