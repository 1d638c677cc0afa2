"""Qwen2-VL vision encoder: flattened patches → merged visual tokens, one fixed-shape graph.

    patches [N, C*T*P*P] ──MatMul──▶ [N, E] ──▶ depth × (LayerNorm → 2-D rotary attention → LayerNorm → MLP)
        ──▶ LayerNorm ──reshape──▶ [N/4, 4E] ──▶ Linear → GELU → Linear ──▶ [N/4, hidden]

Attention stays inside each temporal group (a still image is one group, a video has frames/2): one call
encodes one image or video, whose groups are equal in size, so attention is a batched MatMul over the groups
— no mask, and no scores between groups.
"""

from __future__ import annotations

from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from mindvl.shapes.config import VisionConfig
from mindvl.qwen2vl.layers import apply_rotary, layer_norm, linear, quick_gelu, softmax_f32

WEIGHTS_PER_BLOCK = 12
_bmm = ops.BatchMatMul()
_bmm_t = ops.BatchMatMul(transpose_b=True)


class VisionEncoder(nn.Cell):
    """construct(patches, cos, sin, *weights) with weights in `vision_weight_names` order, for one image or
    video of `groups` temporal groups."""

    def __init__(self, cfg: VisionConfig, groups: int) -> None:
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.scale = cfg.head_dim**-0.5

    def attention(self, x: Tensor, w: tuple, cos: Tensor, sin: Tensor) -> Tensor:
        n, g, heads = x.shape[0], self.groups, self.cfg.num_heads
        # Split, not qkv[:, i]: MindSpore 2.10's CPU StridedSlice took 25 ms per [1024, 1280] slice, Split 1 ms.
        q, k, v = (t.reshape(n, heads, -1) for t in ops.split(linear(x, w[0], w[1]), self.cfg.embed_dim, -1))
        cos, sin = cos.reshape(n, 1, -1), sin.reshape(n, 1, -1)

        def by_group(t: Tensor) -> Tensor:  # [n, heads, d] -> [groups * heads, n / groups, d]
            return t.reshape(g, n // g, heads, -1).transpose(0, 2, 1, 3).reshape(g * heads, n // g, -1)

        # Rotary in float32 whatever the model dtype, as the reference does.
        q = by_group(apply_rotary(q.astype(mstype.float32), cos, sin).astype(x.dtype) * self.scale)
        k = by_group(apply_rotary(k.astype(mstype.float32), cos, sin).astype(x.dtype))
        # The scale goes on q, not on the scores: n × d multiplies per head instead of n × n.
        probs = softmax_f32(_bmm_t(q, k), x.dtype)
        out = _bmm(probs, by_group(v))
        out = out.reshape(g, heads, n // g, -1).transpose(0, 2, 1, 3).reshape(n, -1)
        return linear(out, w[2], w[3])

    def construct(self, patches: Tensor, cos: Tensor, sin: Tensor, *weights: Tensor) -> Tensor:
        cfg = self.cfg
        x = linear(patches, weights[0])
        for i in range(cfg.depth):
            w = weights[1 + i * WEIGHTS_PER_BLOCK: 1 + (i + 1) * WEIGHTS_PER_BLOCK]
            x = x + self.attention(layer_norm(x, w[0], w[1]), w[2:6], cos, sin)
            h = layer_norm(x, w[6], w[7])
            x = x + linear(quick_gelu(linear(h, w[8], w[9])), w[10], w[11])
        m = weights[1 + cfg.depth * WEIGHTS_PER_BLOCK:]
        x = layer_norm(x, m[0], m[1]).reshape(-1, cfg.merged_dim)
        return linear(ops.gelu(linear(x, m[2], m[3]), approximate="none"), m[4], m[5])
