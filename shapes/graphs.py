"""Every exported graph's name, inputs and outputs, declared once: export builds them, the runtime feeds them.

    vision_{H}x{W}          patches, cos, sin                       ─▶ visual tokens        (+ vision weights)
    video_{T}x{H}x{W}       same, T/2 frame groups                  ─▶ visual tokens        (+ vision weights)
    prefill_b{B}_s{S}_c{C}  embeds, position_ids, cache_positions,  ─▶ logits [B, 1, V]    (+ KV cache, text weights)
                            mask, logits_index
    decode_b{B}_c{C}        the same with S = 1                     ─▶ logits [B, 1, V]    (+ KV cache, text weights)

After the data inputs come the KV cache tensors (text graphs; updated in place, shared by every text graph of
one batch × cache size) and then the weights of the graph's group, in the manifest's order.

A tensor-parallel artifact (`tp` > 1) declares its text graphs at one rank's shapes (shapes/parallel.py): the cache
holds the rank's kv heads and the logits its slice of the vocabulary. Names do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from mindvl.shapes.config import ModelConfig
from mindvl.shapes.parallel import text_shard

FORMATS = ("mindir", "onnx")  # MindSpore MindIR (run by MindSpore), ONNX (run by onnxruntime)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "float16" | "bfloat16" | "int32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class GraphSpec:
    name: str
    kind: str  # "vision" | "video" | "prefill" | "decode"
    bucket: dict[str, int]
    inputs: tuple[TensorSpec, ...]
    caches: tuple[TensorSpec, ...]
    weights: str  # the weight group fed after inputs and caches: "vision" | "text"
    outputs: tuple[TensorSpec, ...]
    format: str = "mindir"  # one of FORMATS: the file's, and which executor runs it

    @property
    def file(self) -> str:
        return f"graphs/{self.name}.{self.format}"

    def in_format(self, fmt: str) -> GraphSpec:
        return GraphSpec(self.name, self.kind, self.bucket, self.inputs, self.caches, self.weights, self.outputs, fmt)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "format": self.format, "file": self.file,
                "bucket": dict(self.bucket), "inputs": [t.to_dict() for t in self.inputs],
                "caches": [t.to_dict() for t in self.caches], "weights": self.weights,
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphSpec:
        specs = lambda key: tuple(TensorSpec.from_dict(t) for t in d[key])  # noqa: E731
        return cls(d["name"], d["kind"], dict(d["bucket"]), specs("inputs"), specs("caches"), d["weights"],
                   specs("outputs"), d.get("format", "mindir"))


def vision_graph(cfg: ModelConfig, frames: int, height: int, width: int, dtype: str) -> GraphSpec:
    """An image bucket (frames=1: the image fills one temporal patch) or a video bucket (frames even)."""
    v = cfg.vision
    groups = max(1, frames // v.temporal_patch_size)
    n = groups * (height // v.patch_size) * (width // v.patch_size)
    if frames == 1:
        name, kind = f"vision_{height}x{width}", "vision"
    else:
        name, kind = f"video_{frames}x{height}x{width}", "video"
    return GraphSpec(
        name, kind, {"frames": frames, "height": height, "width": width, "groups": groups},
        inputs=(TensorSpec("patches", (n, v.patch_dim), dtype), TensorSpec("cos", (n, v.head_dim), "float32"),
                TensorSpec("sin", (n, v.head_dim), "float32")),
        caches=(), weights="vision",
        outputs=(TensorSpec("visual_tokens", (n // v.spatial_merge_size**2, cfg.text.hidden_size), dtype),))


def kv_cache_shape(cfg: ModelConfig, batch: int, capacity: int, tp: int = 1) -> tuple[int, int]:
    """One layer's k (or v) cache on one of `tp` ranks: a slot per row, key-value head and position, each head_dim
    wide."""
    return (batch * text_shard(cfg.text, tp).kv_heads * capacity, cfg.text.head_dim)


def kv_cache_specs(cfg: ModelConfig, batch: int, capacity: int, dtype: str, tp: int = 1) -> tuple[TensorSpec, ...]:
    shape = kv_cache_shape(cfg, batch, capacity, tp)
    return tuple(TensorSpec(f"cache_{kind}_{i}", shape, dtype) for kind in ("k", "v")
                 for i in range(cfg.text.num_hidden_layers))


def text_graph(cfg: ModelConfig, batch: int, seq: int, capacity: int, dtype: str, tp: int = 1) -> GraphSpec:
    """Prefill (seq > 1) or decode (seq == 1) over a cache of `capacity` slots, as one of `tp` ranks runs it."""
    t = cfg.text
    name, kind = (f"decode_b{batch}_c{capacity}", "decode") if seq == 1 else (f"prefill_b{batch}_s{seq}_c{capacity}",
                                                                            "prefill")
    return GraphSpec(
        name, kind, {"batch": batch, "seq": seq, "cache": capacity},
        inputs=(TensorSpec("embeds", (batch, seq, t.hidden_size), dtype),
                TensorSpec("position_ids", (3, batch, seq), "int32"),
                TensorSpec("cache_positions", (batch, seq), "int32"),
                TensorSpec("mask", (batch, seq, capacity), dtype),
                TensorSpec("logits_index", (batch, 1), "int32")),
        caches=kv_cache_specs(cfg, batch, capacity, dtype, tp), weights="text",
        outputs=(TensorSpec("logits", (batch, 1, text_shard(t, tp).vocab), "float32"),))


def present_name(cache: str) -> str:
    """An ONNX text graph's output that returns cache input `cache` with the call's slots written (MindIR graphs
    update their cache inputs in place and return only the logits)."""
    return f"{cache}.present"


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a tensor of `dtype`."""
    return {"float16": 2, "bfloat16": 2}.get(dtype, 4)


def all_graphs(cfg: ModelConfig, buckets: Any, dtype: str, formats: Sequence[str] = ("mindir",)) -> list[GraphSpec]:
    """Every graph a bucket spec calls for: each image and video bucket, and per batch size one prefill graph
    per (prefill length, cache) pair with length ≤ cache and one decode graph per cache."""
    graphs = [vision_graph(cfg, 1, b.height, b.width, dtype) for b in buckets.images]
    graphs += [vision_graph(cfg, b.frames, b.height, b.width, dtype) for b in buckets.videos]
    for batch in buckets.batch:
        lengths = [*buckets.prefill_cache_pairs(), *((1, cache) for cache in buckets.cache)]
        graphs += [text_graph(cfg, batch, seq, cache, dtype, buckets.tp) for seq, cache in lengths]
    return [g.in_format(fmt) for fmt in formats for g in graphs]
