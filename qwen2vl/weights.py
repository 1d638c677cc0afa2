"""Checkpoint loading: HF safetensors (single or sharded) → numpy arrays under the declared weight names.

The name map is built from the declaration (shapes/weights.py): each layer kind's roles, by their checkpoint names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mindvl.errors import CheckpointError
from mindvl.shapes.config import ModelConfig
from mindvl.shapes.weights import (
    MergerWeights,
    PatchEmbedWeights,
    TextEmbedWeights,
    TextHeadWeights,
    TextLayerWeights,
    VisionBlockWeights,
    aliases,
    stored_weights,
    text_embed,
    text_weights,
    vision_weights,
)
from mindvl.tensorfile import read_safetensors

# Each role's checkpoint name (hub layout), after its layer's prefix.
_HUB_ROLES: dict[type, dict[str, str]] = {
    PatchEmbedWeights: {"weight": "proj.weight"},
    VisionBlockWeights: {
        "norm1_weight": "norm1.weight", "norm1_bias": "norm1.bias",
        "qkv_weight": "attn.qkv.weight", "qkv_bias": "attn.qkv.bias",
        "proj_weight": "attn.proj.weight", "proj_bias": "attn.proj.bias",
        "norm2_weight": "norm2.weight", "norm2_bias": "norm2.bias",
        "fc1_weight": "mlp.fc1.weight", "fc1_bias": "mlp.fc1.bias",
        "fc2_weight": "mlp.fc2.weight", "fc2_bias": "mlp.fc2.bias"},
    MergerWeights: {
        "norm_weight": "ln_q.weight", "norm_bias": "ln_q.bias",
        "fc1_weight": "mlp.0.weight", "fc1_bias": "mlp.0.bias",
        "fc2_weight": "mlp.2.weight", "fc2_bias": "mlp.2.bias"},
    TextEmbedWeights: {"weight": "embed_tokens.weight"},
    TextLayerWeights: {
        "input_norm_weight": "input_layernorm.weight",
        "q_weight": "self_attn.q_proj.weight", "q_bias": "self_attn.q_proj.bias",
        "k_weight": "self_attn.k_proj.weight", "k_bias": "self_attn.k_proj.bias",
        "v_weight": "self_attn.v_proj.weight", "v_bias": "self_attn.v_proj.bias",
        "o_weight": "self_attn.o_proj.weight",
        "post_attention_norm_weight": "post_attention_layernorm.weight",
        "gate_weight": "mlp.gate_proj.weight", "up_weight": "mlp.up_proj.weight",
        "down_weight": "mlp.down_proj.weight"},
    TextHeadWeights: {"norm_weight": "model.norm.weight", "lm_head_weight": "lm_head.weight"},
}
# transformers >= 4.52 saves the towers nested (the LM head stays at the top level).
_NESTED = (("model.visual.", "visual."), ("model.language_model.", "model."))


def checkpoint_names(cfg: ModelConfig) -> dict[str, str]:
    """The declared name of every weight the model reads from a checkpoint, by its hub-layout checkpoint name (a
    tied LM head is not read: it is the embedding table)."""
    v, t, tied = vision_weights(cfg.vision), text_weights(cfg.text), aliases(cfg.text)
    parts = [("visual.patch_embed.", v.patch_embed), *((f"visual.blocks.{i}.", b) for i, b in enumerate(v.blocks)),
             ("visual.merger.", v.merger), ("model.", text_embed(cfg.text)),
             *((f"model.layers.{i}.", layer) for i, layer in enumerate(t.layers)), ("", t.head)]
    return {prefix + _HUB_ROLES[type(part)][role]: w.name
            for prefix, part in parts for role, w in part._asdict().items() if w.name not in tied}


def hub_name(hf_name: str) -> str:
    """A checkpoint tensor's name in the hub layout, whichever layout it was saved in."""
    for nested, hub in _NESTED:
        if hf_name.startswith(nested):
            return hub + hf_name.removeprefix(nested)
    return hf_name


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
    """Read, rename and shape-check every weight the model needs (float32 or float16 as stored, bf16 widened), in
    weights.safetensors order, aliases (a tied LM head) last."""
    model_dir = Path(model_dir)
    names, wanted = checkpoint_names(cfg), {w.name: w.shape for w in stored_weights(cfg)}
    patch_embed = vision_weights(cfg.vision).patch_embed.weight.name
    found: dict[str, np.ndarray] = {}
    for path in checkpoint_files(model_dir):
        for hf_name, arr in read_safetensors(path, CheckpointError, "re-download it").items():
            name = names.get(hub_name(hf_name))
            if name is None:
                continue
            if name == patch_embed:
                # Conv3d with kernel == stride over (C, T, P, P) patches is a MatMul on the flattened patch.
                arr = arr.reshape(arr.shape[0], -1)
            if tuple(arr.shape) != wanted[name]:
                raise CheckpointError(f"tensor {hf_name} in {path.name} has shape {list(arr.shape)} but config.json "
                                      f"implies {list(wanted[name])}: the checkpoint does not match its config.json; "
                                      f"re-download it, or use its own config.json")
            found[name] = arr
    missing = [n for n in wanted if n not in found]
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from the checkpoint in {model_dir} (first: "
                              f"{missing[0]}); the files are incomplete or belong to another model")
    return {**{name: found[name] for name in wanted},
            **{alias: found[target] for alias, target in aliases(cfg.text).items()}}
