"""Checkpoint loading: HF safetensors (single or sharded) → numpy arrays under our cell names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mindvl.errors import CheckpointError
from mindvl.tensorfile import read_safetensors
from mindvl.shapes.config import ModelConfig

_RULES = (
    (re.compile(r"^(?:model\.)?visual\.patch_embed\.proj\.weight$"), "vision.patch_embed.weight"),
    (re.compile(r"^(?:model\.)?visual\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$"), r"vision.blocks.\1.\2.\3"),
    (re.compile(r"^(?:model\.)?visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$"), r"vision.blocks.\1.\2.\3"),
    (re.compile(r"^(?:model\.)?visual\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"vision.blocks.\1.\2.\3"),
    (re.compile(r"^(?:model\.)?visual\.merger\.ln_q\.(weight|bias)$"), r"vision.merger.norm.\1"),
    (re.compile(r"^(?:model\.)?visual\.merger\.mlp\.0\.(weight|bias)$"), r"vision.merger.fc1.\1"),
    (re.compile(r"^(?:model\.)?visual\.merger\.mlp\.2\.(weight|bias)$"), r"vision.merger.fc2.\1"),
    (re.compile(r"^model\.(?:language_model\.)?embed_tokens\.weight$"), "text.embed.weight"),
    (re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.(weight|bias)$"),
     r"text.layers.\1.\2.\3"),
    (re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$"),
     r"text.layers.\1.\2.weight"),
    (re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.(input|post_attention)_layernorm\.weight$"),
     r"text.layers.\1.\2_norm.weight"),
    (re.compile(r"^model\.(?:language_model\.)?norm\.weight$"), "text.norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "text.lm_head.weight"),
)


def cell_name(hf_name: str) -> str | None:
    """Map a checkpoint tensor name (hub layout or transformers ≥4.52 layout) to our cell name; None if unused."""
    for pattern, target in _RULES:
        if pattern.match(hf_name):
            return pattern.sub(target, hf_name)
    return None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the cells read, with its shape, in the order the graphs take them as inputs."""
    t, v = cfg.text, cfg.vision
    e, m, h, d = v.embed_dim, v.mlp_dim, t.hidden_size, t.head_dim
    shapes: dict[str, tuple[int, ...]] = {"vision.patch_embed.weight": (e, v.patch_dim)}
    for i in range(v.depth):
        p = f"vision.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (e,), p + "norm1.bias": (e,),
            p + "qkv.weight": (3 * e, e), p + "qkv.bias": (3 * e,),
            p + "proj.weight": (e, e), p + "proj.bias": (e,),
            p + "norm2.weight": (e,), p + "norm2.bias": (e,),
            p + "fc1.weight": (m, e), p + "fc1.bias": (m,),
            p + "fc2.weight": (e, m), p + "fc2.bias": (e,),
        })
    shapes.update({
        "vision.merger.norm.weight": (e,), "vision.merger.norm.bias": (e,),
        "vision.merger.fc1.weight": (v.merged_dim, v.merged_dim), "vision.merger.fc1.bias": (v.merged_dim,),
        "vision.merger.fc2.weight": (h, v.merged_dim), "vision.merger.fc2.bias": (h,),
        "text.embed.weight": (t.vocab_size, h),
    })
    q, kv = t.num_attention_heads * d, t.num_key_value_heads * d
    for i in range(t.num_hidden_layers):
        p = f"text.layers.{i}."
        shapes.update({
            p + "input_norm.weight": (h,),
            p + "q.weight": (q, h), p + "q.bias": (q,),
            p + "k.weight": (kv, h), p + "k.bias": (kv,),
            p + "v.weight": (kv, h), p + "v.bias": (kv,),
            p + "o.weight": (h, q),
            p + "post_attention_norm.weight": (h,),
            p + "gate.weight": (t.intermediate_size, h), p + "up.weight": (t.intermediate_size, h),
            p + "down.weight": (h, t.intermediate_size),
        })
    shapes.update({"text.norm.weight": (h,), "text.lm_head.weight": (t.vocab_size, h)})
    return shapes


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e}); re-download it") from None
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise CheckpointError(f"shard {shard} listed in {index.name} is missing from {model_dir}; "
                                      f"download every shard of the checkpoint")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}; "
                          f"pass a folder holding the checkpoint's safetensors files")


def load_weights(model_dir: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Read, rename and shape-check every tensor the model needs (float32 or float16 as stored, bf16 widened)."""
    model_dir = Path(model_dir)
    wanted = expected_shapes(cfg)
    found: dict[str, np.ndarray] = {}
    for path in checkpoint_files(model_dir):
        for hf_name, arr in read_safetensors(path, CheckpointError, "re-download it").items():
            name = cell_name(hf_name)
            if name not in wanted:
                continue
            if name == "vision.patch_embed.weight":
                # Conv3d with kernel == stride over (C, T, P, P) patches is a MatMul on the flattened patch.
                arr = arr.reshape(arr.shape[0], -1)
            if tuple(arr.shape) != wanted[name]:
                raise CheckpointError(f"tensor {hf_name} in {path.name} has shape {list(arr.shape)} but config.json "
                                      f"implies {list(wanted[name])}; the checkpoint does not match its config.json")
            found[name] = arr
    if cfg.text.tie_word_embeddings and "text.embed.weight" in found:
        found["text.lm_head.weight"] = found["text.embed.weight"]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from the checkpoint in {model_dir} (first: {missing[0]}); "
                              f"the files are incomplete or belong to another model")
    return {name: found[name] for name in wanted}


def vision_weight_names(cfg: ModelConfig) -> list[str]:
    return [n for n in expected_shapes(cfg) if n.startswith("vision.")]


def text_weight_names(cfg: ModelConfig) -> list[str]:
    """The decoder graph's weights; the embedding table stays on the host, where prompts are embedded."""
    return [n for n in expected_shapes(cfg) if n.startswith("text.") and n != "text.embed.weight"]
