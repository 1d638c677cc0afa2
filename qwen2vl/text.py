"""Qwen2 text decoder over a static KV cache: one cell serves prefill, decode and full forwards.

    embeds [B, S, H] ──▶ layers × (RMSNorm → GQA attention with M-RoPE over the cache → RMSNorm → SwiGLU)
        ──gather rows `logits_index`──▶ RMSNorm ──▶ lm_head ──▶ logits [B, K, vocab] (float32)

The cache is allocated once at its full capacity (`shapes.graphs.kv_cache_specs`) and passed in as inputs,
which the graph updates in place by slot, so prefill (S = bucket length) and decode (S = 1) graphs share it
without copies and an exported graph holds none of it. The host owns how much of it is filled and says so
through `cache_positions` (slots written by this call) and the additive `mask`.

With `tp` > 1 the cell is one rank's part of the decoder (shapes/parallel.py): its heads, hidden units and vocabulary
slice, an all-reduce after o_proj and after down. The collective's group is the default world group, which MindSpore
names `hccl_world_group` when the graph is exported without a communication context (runtime/tp_worker.py).
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from mindvl.qwen2vl.layers import apply_rotary, full, linear, rms_norm, silu, softmax_f32
from mindvl.shapes.config import TextConfig
from mindvl.shapes.parallel import text_shard
from mindvl.shapes.weights import TextLayerWeights, text_weights

_bmm = ops.BatchMatMul()
_bmm_t = ops.BatchMatMul(transpose_b=True)


def mrope_table(cfg: TextConfig) -> np.ndarray:
    """[3, head_dim] float32: row i holds the inverse frequency of each rotary dim driven by index i (t, h, w).

    Multiplying positions [.., 3] by it gives each dim its angle from its own section's index, which is
    the reference's split-and-pick of the mrope sections, as one exact MatMul (one non-zero per column).
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)))
    section = np.repeat(np.arange(3), cfg.mrope_section)
    table = np.zeros((3, cfg.head_dim), np.float32)
    for d in range(cfg.head_dim):
        table[section[d % half], d] = inv_freq[d % half]
    return table


class TextStep(nn.Cell):
    """construct(embeds, position_ids, cache_positions, mask, logits_index, *caches_then_weights) → logits.

    embeds [B, S, H]; position_ids [3, B, S] int32 (M-RoPE); cache_positions [B, S] int32 (slot each token is
    written to); mask [B, S, C] additive; logits_index [B, K] int32 (rows whose logits are returned); then
    the keys of every layer, the values of every layer ([B*kv_heads*C, head_dim] each, updated in place),
    then the "text" group's weights (`shapes.weights.text_weights`), each found by its role.
    """

    def __init__(self, cfg: TextConfig, batch: int, capacity: int, tp: int = 1) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.shard = text_shard(cfg, tp)
        self.scale = cfg.head_dim**-0.5
        self.rope = Tensor(mrope_table(cfg))
        self.at = text_weights(cfg, tp).positions()  # each weight's position among the weight inputs
        self.all_reduce = ops.AllReduce() if tp > 1 else None
        kvh = self.shard.kv_heads
        # First row of each (batch, kv head) block in the flattened cache.
        self.row_base = Tensor((np.arange(batch * kvh, dtype=np.int32) * capacity).reshape(batch, kvh, 1))

    def rotary(self, position_ids: Tensor, dtype: mstype.Type) -> tuple[Tensor, Tensor]:
        pos = position_ids.astype(mstype.float32).transpose(1, 2, 0)
        angle = ops.matmul(pos, self.rope)
        return ops.cos(angle).astype(dtype), ops.sin(angle).astype(dtype)

    def reduce(self, x: Tensor) -> Tensor:
        """The sum of every rank's partial product (row-parallel o_proj and down); on one rank, `x`."""
        return self.all_reduce(x) if self.tp > 1 else x

    def attention(self, x: Tensor, w: tuple, at: TextLayerWeights, cache_k: Tensor, cache_v: Tensor, cos: Tensor,
                  sin: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
        cfg = self.cfg
        b, s = x.shape[0], x.shape[1]
        kvh, groups, d = self.shard.kv_heads, self.shard.kv_groups, cfg.head_dim
        cos, sin = cos.reshape(b, s, 1, d), sin.reshape(b, s, 1, d)
        q = linear(x, w[at.q_weight], w[at.q_bias]).reshape(b, s, -1, d)
        q = apply_rotary(q, cos, sin) * self.scale  # s × d, not s × C
        k = apply_rotary(linear(x, w[at.k_weight], w[at.k_bias]).reshape(b, s, kvh, d), cos, sin)
        v = linear(x, w[at.v_weight], w[at.v_bias]).reshape(b, s, kvh, d)
        keys = ops.scatter_update(cache_k, rows, k.transpose(0, 2, 1, 3))
        values = ops.scatter_update(cache_v, rows, v.transpose(0, 2, 1, 3))
        keys = keys.reshape(b, kvh, -1, d)
        values = values.reshape(b, kvh, -1, d)
        # Query heads of one kv head are stacked along the rows, so GQA needs no copy of the cache.
        q = q.reshape(b, s, kvh, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, groups * s, d)
        scores = _bmm_t(q, keys).reshape(b, kvh, groups, s, -1)
        scores = scores + full(mask.reshape(b, 1, 1, s, -1), scores.shape)
        probs = softmax_f32(scores, x.dtype).reshape(b, kvh, groups * s, -1)
        out = _bmm(probs, values).reshape(b, kvh, groups, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, -1)
        return self.reduce(linear(out, w[at.o_weight]))

    def construct(self, embeds: Tensor, position_ids: Tensor, cache_positions: Tensor, mask: Tensor,
                  logits_index: Tensor, *tensors: Tensor) -> Tensor:
        cfg = self.cfg
        layers = cfg.num_hidden_layers
        keys, values, w = tensors[:layers], tensors[layers:2 * layers], tensors[2 * layers:]
        b, s = embeds.shape[0], embeds.shape[1]
        cos, sin = self.rotary(position_ids, embeds.dtype)
        rows_shape = (b, self.shard.kv_heads, s)
        rows = full(self.row_base, rows_shape) + full(cache_positions.reshape(b, 1, s), rows_shape)
        x = embeds
        for i in range(layers):
            at = self.at.layers[i]
            h = rms_norm(x, w[at.input_norm_weight], cfg.rms_norm_eps)
            x = x + self.attention(h, w, at, keys[i], values[i], cos, sin, rows, mask)
            h = rms_norm(x, w[at.post_attention_norm_weight], cfg.rms_norm_eps)
            x = x + self.reduce(linear(silu(linear(h, w[at.gate_weight])) * linear(h, w[at.up_weight]),
                                       w[at.down_weight]))
        k = logits_index.shape[1]
        x = ops.gather_elements(x, 1, logits_index.reshape(b, k, 1).broadcast_to((b, k, cfg.hidden_size)))
        head = self.at.head
        return linear(rms_norm(x, w[head.norm_weight], cfg.rms_norm_eps), w[head.lm_head_weight]).astype(mstype.float32)
