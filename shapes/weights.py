"""The weight contract: every weight of the model, declared once by layer kind and role, with its shape and split.

A layer kind is a NamedTuple whose fields are its weights' roles, in graph-input order. Filled with `Weight`s it
is the declaration; filled with integers (`positions()`) it tells a cell where each role sits among its graph's
weight inputs. The checkpoint name map, the cells, the exporter, the manifest and the runtime's checks all read
this one declaration: reordering it reorders all of them together, and a checkpoint or manifest that disagrees with
it (two same-shaped norms swapped, say) is refused instead of silently computing another model.

`split` records how tensor parallelism (shapes/parallel.py, Megatron's layout) shards each weight:

    column      along the output dimension (dim 0 of the [out, in] layout), the bias with it: q, k, v, gate, up,
                fc1, the LM head (by vocabulary rows) — each rank computes some heads, hidden units or logits. The
                vision qkv is fused: each of its three [E, E] blocks would split by heads, not the tensor as a
                whole (the vision encoder runs whole on one rank).
    row         along the input dimension (dim 1): o, down, proj, fc2 — the ranks' partial products are summed by
                an all-reduce.
    replicated  whole on every rank: norms, biases added after that all-reduce, the patch embedding; the token
                embedding lives on the host.

`text_weights(t, tp)` declares the decoder's weights at one rank's shapes; the stored weights are those of tp=1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from mindvl.shapes.config import ModelConfig, TextConfig, VisionConfig
from mindvl.shapes.graphs import TensorSpec
from mindvl.shapes.parallel import text_shard

COLUMN, ROW, REPLICATED = "column", "row", "replicated"
SPLITS = (COLUMN, ROW, REPLICATED)


@dataclass(frozen=True)
class Weight:
    name: str  # the graph input's name, and the tensor's name in weights.safetensors
    shape: tuple[int, ...]
    split: str  # one of SPLITS

    def to_dict(self, dtype: str) -> dict[str, Any]:
        """The manifest's entry for this weight stored in `dtype`."""
        return {**TensorSpec(self.name, self.shape, dtype).to_dict(), "split": self.split}


# Fields are `Weight`s in the declaration, ints in `positions()`.

class PatchEmbedWeights(NamedTuple):
    """The Conv3d patch embedding, as the MatMul over flattened patches it is (its kernel equals its stride)."""
    weight: Any


class VisionBlockWeights(NamedTuple):
    norm1_weight: Any
    norm1_bias: Any
    qkv_weight: Any
    qkv_bias: Any
    proj_weight: Any
    proj_bias: Any
    norm2_weight: Any
    norm2_bias: Any
    fc1_weight: Any
    fc1_bias: Any
    fc2_weight: Any
    fc2_bias: Any


class MergerWeights(NamedTuple):
    norm_weight: Any
    norm_bias: Any
    fc1_weight: Any
    fc1_bias: Any
    fc2_weight: Any
    fc2_bias: Any


class TextEmbedWeights(NamedTuple):
    """The token embedding table: host-side (prompts are embedded in numpy), in no graph's group."""
    weight: Any


class TextLayerWeights(NamedTuple):
    input_norm_weight: Any
    q_weight: Any
    q_bias: Any
    k_weight: Any
    k_bias: Any
    v_weight: Any
    v_bias: Any
    o_weight: Any
    post_attention_norm_weight: Any
    gate_weight: Any
    up_weight: Any
    down_weight: Any


class TextHeadWeights(NamedTuple):
    """The final norm and the LM head."""
    norm_weight: Any
    lm_head_weight: Any


def _declare(kind: type, prefix: str, **roles: tuple[tuple[int, ...], str]) -> Any:
    """`kind` with each role's Weight, named `prefix` + the role with its last `_` a dot (q_weight: q.weight)."""
    return kind(**{role: Weight(prefix + ".".join(role.rsplit("_", 1)), shape, split)
                   for role, (shape, split) in roles.items()})


def _numbered(parts: tuple[tuple, ...]) -> list[tuple]:
    """Each part with its weights replaced by their positions in the concatenation of `parts`."""
    out, start = [], 0
    for part in parts:
        out.append(type(part)(*range(start, start + len(part))))
        start += len(part)
    return out


class _Group:
    """The weights one kind of graph takes as inputs, after its data inputs and caches, part by part."""

    def parts(self) -> tuple[tuple, ...]:
        raise NotImplementedError

    def weights(self) -> tuple[Weight, ...]:
        return tuple(w for part in self.parts() for w in part)


@dataclass(frozen=True)
class VisionWeights(_Group):
    patch_embed: PatchEmbedWeights
    blocks: tuple[VisionBlockWeights, ...]
    merger: MergerWeights

    def parts(self) -> tuple[tuple, ...]:
        return (self.patch_embed, *self.blocks, self.merger)

    def positions(self) -> VisionWeights:
        patch_embed, *blocks, merger = _numbered(self.parts())
        return VisionWeights(patch_embed, tuple(blocks), merger)


@dataclass(frozen=True)
class TextWeights(_Group):
    layers: tuple[TextLayerWeights, ...]
    head: TextHeadWeights

    def parts(self) -> tuple[tuple, ...]:
        return (*self.layers, self.head)

    def positions(self) -> TextWeights:
        *layers, head = _numbered(self.parts())
        return TextWeights(tuple(layers), head)


def vision_weights(v: VisionConfig) -> VisionWeights:
    e, m, merged = v.embed_dim, v.mlp_dim, v.merged_dim

    def block(i: int) -> VisionBlockWeights:
        return _declare(
            VisionBlockWeights, f"vision.blocks.{i}.",
            norm1_weight=((e,), REPLICATED), norm1_bias=((e,), REPLICATED),
            qkv_weight=((3 * e, e), COLUMN), qkv_bias=((3 * e,), COLUMN),
            proj_weight=((e, e), ROW), proj_bias=((e,), REPLICATED),
            norm2_weight=((e,), REPLICATED), norm2_bias=((e,), REPLICATED),
            fc1_weight=((m, e), COLUMN), fc1_bias=((m,), COLUMN),
            fc2_weight=((e, m), ROW), fc2_bias=((e,), REPLICATED))

    return VisionWeights(
        patch_embed=_declare(PatchEmbedWeights, "vision.patch_embed.", weight=((e, v.patch_dim), REPLICATED)),
        blocks=tuple(block(i) for i in range(v.depth)),
        merger=_declare(MergerWeights, "vision.merger.",
                        norm_weight=((e,), REPLICATED), norm_bias=((e,), REPLICATED),
                        fc1_weight=((merged, merged), COLUMN), fc1_bias=((merged,), COLUMN),
                        fc2_weight=((v.hidden_size, merged), ROW), fc2_bias=((v.hidden_size,), REPLICATED)))


def text_embed(t: TextConfig) -> TextEmbedWeights:
    return _declare(TextEmbedWeights, "text.embed.", weight=((t.vocab_size, t.hidden_size), REPLICATED))


def text_weights(t: TextConfig, tp: int = 1) -> TextWeights:
    """The decoder's weights as one of `tp` ranks takes them (tp=1: whole, as stored)."""
    shard = text_shard(t, tp)
    h, f, vocab = t.hidden_size, shard.intermediate, shard.vocab
    q, kv = shard.heads * t.head_dim, shard.kv_heads * t.head_dim

    def layer(i: int) -> TextLayerWeights:
        return _declare(
            TextLayerWeights, f"text.layers.{i}.",
            input_norm_weight=((h,), REPLICATED),
            q_weight=((q, h), COLUMN), q_bias=((q,), COLUMN),
            k_weight=((kv, h), COLUMN), k_bias=((kv,), COLUMN),
            v_weight=((kv, h), COLUMN), v_bias=((kv,), COLUMN),
            o_weight=((h, q), ROW),
            post_attention_norm_weight=((h,), REPLICATED),
            gate_weight=((f, h), COLUMN), up_weight=((f, h), COLUMN), down_weight=((h, f), ROW))

    return TextWeights(
        layers=tuple(layer(i) for i in range(t.num_hidden_layers)),
        head=_declare(TextHeadWeights, "text.",
                      norm_weight=((h,), REPLICATED), lm_head_weight=((vocab, h), COLUMN)))


def aliases(t: TextConfig) -> dict[str, str]:
    """Graph inputs stored under another weight's name: a tied LM head is the embedding table."""
    return {text_weights(t).head.lm_head_weight.name: text_embed(t).weight.name} if t.tie_word_embeddings else {}


def weight_groups(cfg: ModelConfig) -> dict[str, tuple[Weight, ...]]:
    """Each graph kind's weights in input order: "vision" for image and video graphs, "text" for prefill and
    decode (GraphSpec.weights names the group)."""
    return {"vision": vision_weights(cfg.vision).weights(), "text": text_weights(cfg.text).weights()}


def stored_weights(cfg: ModelConfig) -> tuple[Weight, ...]:
    """What weights.safetensors holds, in its order: every graph's weights and the embedding table, each once."""
    groups, tied = weight_groups(cfg), aliases(cfg.text)
    return tuple(w for w in (*groups["vision"], *text_embed(cfg.text), *groups["text"]) if w.name not in tied)


def manifest_weights(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The manifest's `weights` section but its file: every group's entries in input order, aliases, the table."""
    return {"groups": {name: [w.to_dict(dtype) for w in group] for name, group in weight_groups(cfg).items()},
            "aliases": aliases(cfg.text), "embed": text_embed(cfg.text).weight.to_dict(dtype)}
