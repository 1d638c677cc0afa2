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

from mindvl.qwen2vl.layers import apply_rotary, layer_norm, linear, quick_gelu, softmax_f32
from mindvl.shapes.config import VisionConfig
from mindvl.shapes.weights import VisionBlockWeights, vision_weights

_bmm = ops.BatchMatMul()
_bmm_t = ops.BatchMatMul(transpose_b=True)


class VisionEncoder(nn.Cell):
    """construct(patches, cos, sin, *weights) with the "vision" group's weights (`shapes.weights.vision_weights`),
    each found by its role, for one image or video of `groups` temporal groups."""

    def __init__(self, cfg: VisionConfig, groups: int) -> None:
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.scale = cfg.head_dim**-0.5
        self.at = vision_weights(cfg).positions()  # each weight's position among the weight inputs

    def attention(self, x: Tensor, w: tuple, at: VisionBlockWeights, cos: Tensor, sin: Tensor) -> Tensor:
        n, g, heads = x.shape[0], self.groups, self.cfg.num_heads
        qkv = linear(x, w[at.qkv_weight], w[at.qkv_bias])
        # Split, not qkv[:, i]: MindSpore 2.10's CPU StridedSlice took 25 ms per [1024, 1280] slice, Split 1 ms.
        q, k, v = (t.reshape(n, heads, -1) for t in ops.split(qkv, self.cfg.embed_dim, -1))
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
        return linear(out, w[at.proj_weight], w[at.proj_bias])

    def construct(self, patches: Tensor, cos: Tensor, sin: Tensor, *w: Tensor) -> Tensor:
        x = linear(patches, w[self.at.patch_embed.weight])
        for at in self.at.blocks:
            x = x + self.attention(layer_norm(x, w[at.norm1_weight], w[at.norm1_bias]), w, at, cos, sin)
            h = layer_norm(x, w[at.norm2_weight], w[at.norm2_bias])
            x = x + linear(quick_gelu(linear(h, w[at.fc1_weight], w[at.fc1_bias])), w[at.fc2_weight], w[at.fc2_bias])
        m = self.at.merger
        x = layer_norm(x, w[m.norm_weight], w[m.norm_bias]).reshape(-1, self.cfg.merged_dim)
        return linear(ops.gelu(linear(x, w[m.fc1_weight], w[m.fc1_bias]), approximate="none"), w[m.fc2_weight],
                      w[m.fc2_bias])
