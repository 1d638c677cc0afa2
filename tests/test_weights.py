"""The weight declaration, the HF → cell name map built from it, and the safetensors loader (single, sharded,
bf16, tied, corrupt)."""

import json
import math
from dataclasses import replace

import mindspore as ms
import numpy as np
import pytest
from mindspore.common.initializer import Zero
from safetensors import safe_open
from safetensors.numpy import save_file

from mindvl.device import select_device
from mindvl.errors import CheckpointError
from mindvl.qwen2vl.text import TextStep
from mindvl.qwen2vl.vision import VisionEncoder
from mindvl.qwen2vl.weights import checkpoint_names, hub_name, load_weights
from mindvl.shapes.config import ModelConfig
from mindvl.shapes.graphs import text_graph, vision_graph
from mindvl.shapes.weights import SPLITS, stored_weights, text_weights, vision_weights, weight_groups
from mindvl.testing.architectures import FIXTURES, HUB_CONFIGS, hub_config

CONFIG = {
    "model_type": "qwen2_vl", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "tie_word_embeddings": False,
    "vision_config": {"depth": 1, "embed_dim": 8, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 16, "in_chans": 3},
}


@pytest.mark.parametrize("hf, ours", [
    ("visual.patch_embed.proj.weight", "vision.patch_embed.weight"),
    ("visual.blocks.3.attn.qkv.bias", "vision.blocks.3.qkv.bias"),
    ("visual.blocks.0.mlp.fc2.weight", "vision.blocks.0.fc2.weight"),
    ("visual.blocks.31.norm2.bias", "vision.blocks.31.norm2.bias"),
    ("visual.merger.ln_q.weight", "vision.merger.norm.weight"),
    ("visual.merger.mlp.0.bias", "vision.merger.fc1.bias"),
    ("visual.merger.mlp.2.weight", "vision.merger.fc2.weight"),
    ("model.embed_tokens.weight", "text.embed.weight"),
    ("model.layers.27.self_attn.k_proj.bias", "text.layers.27.k.bias"),
    ("model.layers.0.self_attn.o_proj.weight", "text.layers.0.o.weight"),
    ("model.layers.5.mlp.gate_proj.weight", "text.layers.5.gate.weight"),
    ("model.layers.5.input_layernorm.weight", "text.layers.5.input_norm.weight"),
    ("model.layers.5.post_attention_layernorm.weight", "text.layers.5.post_attention_norm.weight"),
    ("model.norm.weight", "text.norm.weight"),
    ("lm_head.weight", "text.lm_head.weight"),
    # The layout transformers >= 4.52 saves.
    ("model.visual.blocks.1.attn.proj.weight", "vision.blocks.1.proj.weight"),
    ("model.language_model.layers.2.mlp.down_proj.weight", "text.layers.2.down.weight"),
    ("model.language_model.embed_tokens.weight", "text.embed.weight"),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", None),
])
def test_name_map(hf, ours):
    names = checkpoint_names(ModelConfig.from_hf(HUB_CONFIGS["7B"]))  # untied, 28 layers, 32 vision blocks
    assert names.get(hub_name(hf)) == ours


CONFIGS = {**{name: hub_config(FIXTURES[name]) for name in ("tiny", "tiny-gqa3")}, **HUB_CONFIGS}


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa3"])
def test_name_map_covers_every_checkpoint_tensor_once(checkpoint, preset):
    model_dir = checkpoint(preset)
    with safe_open(model_dir / "model.safetensors", "np") as f:
        tensors = set(f.keys())
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    names = checkpoint_names(cfg)
    assert set(names) == tensors
    assert sorted(names.values()) == sorted(w.name for w in stored_weights(cfg))


@pytest.mark.parametrize("arch", sorted(HUB_CONFIGS))
def test_declaration_is_transformers_parameters(arch):
    """Every parameter of transformers' model (built on the meta device: no memory) is one declared weight, of the
    declared shape, through the name map; a tied LM head is the embedding table's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**HUB_CONFIGS[arch]))
    cfg = ModelConfig.from_hf(HUB_CONFIGS[arch])
    names, declared = checkpoint_names(cfg), {w.name: w.shape for w in stored_weights(cfg)}
    found = {}
    for hf, param in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue
        shape = tuple(param.shape)
        found[names[hub_name(hf)]] = shape[:1] + (math.prod(shape[1:]),) if param.ndim == 5 else shape  # Conv3d
    assert found == declared


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_cells_take_the_declared_weights(arch):
    """The cells compile (shape inference only: abstract tensors, no memory) with every weight as declared, at the
    published widths, cut to 2 blocks and 2 layers so that positions past the first layer are exercised."""
    cfg = ModelConfig.from_hf(CONFIGS[arch])
    cfg = replace(cfg, text=replace(cfg.text, num_hidden_layers=2), vision=replace(cfg.vision, depth=2))
    groups = weight_groups(cfg)
    select_device()  # as every caller of the cells does, before MindSpore's runtime starts
    side = cfg.vision.patch_size * cfg.vision.spatial_merge_size

    def abstract(shape, dtype="float32"):
        return ms.Tensor(shape=shape, dtype=getattr(ms, dtype), init=Zero())

    for cell, graph in ((VisionEncoder(cfg.vision, 1), vision_graph(cfg, 1, side, side, "float32")),
                        (TextStep(cfg.text, 1, 8), text_graph(cfg, 1, 1, 8, "float32"))):
        weights = [abstract(w.shape) for w in groups[graph.weights]]
        cell.compile(*(abstract(t.shape, t.dtype) for t in graph.inputs + graph.caches), *weights)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_positions_find_each_role_and_splits_are_known(arch):
    cfg = ModelConfig.from_hf(CONFIGS[arch])
    for tower in (vision_weights(cfg.vision), text_weights(cfg.text)):
        group = tower.weights()
        for part, at in zip(tower.parts(), tower.positions().parts(), strict=True):
            assert type(at) is type(part) and type(part)(*(group[i] for i in at)) == part
        assert {w.split for w in group} <= set(SPLITS)
    names = [w.name for group in weight_groups(cfg).values() for w in group]
    assert len(names) == len(set(names))


def hub_tensors() -> dict[str, tuple]:
    """The hub checkpoint's tensors for CONFIG (1 vision block, 1 decoder layer), written out by hand."""
    e, m, h, f = 8, 16, 16, 24
    block = {"norm1.weight": (e,), "norm1.bias": (e,), "norm2.weight": (e,), "norm2.bias": (e,),
             "attn.qkv.weight": (3 * e, e), "attn.qkv.bias": (3 * e,), "attn.proj.weight": (e, e),
             "attn.proj.bias": (e,), "mlp.fc1.weight": (m, e), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (e, m),
             "mlp.fc2.bias": (e,)}
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,), "self_attn.k_proj.weight": (8, h),
             "self_attn.k_proj.bias": (8,), "self_attn.v_proj.weight": (8, h), "self_attn.v_proj.bias": (8,),
             "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
             "mlp.down_proj.weight": (h, f)}
    return {"visual.patch_embed.proj.weight": (e, 3, 2, 14, 14),
            **{f"visual.blocks.0.{k}": s for k, s in block.items()},
            "visual.merger.ln_q.weight": (e,), "visual.merger.ln_q.bias": (e,),
            "visual.merger.mlp.0.weight": (4 * e, 4 * e), "visual.merger.mlp.0.bias": (4 * e,),
            "visual.merger.mlp.2.weight": (h, 4 * e), "visual.merger.mlp.2.bias": (h,),
            "model.embed_tokens.weight": (40, h), **{f"model.layers.0.{k}": s for k, s in layer.items()},
            "model.norm.weight": (h,), "lm_head.weight": (40, h)}


def write_checkpoint(folder, tensors: dict[str, np.ndarray], shards: int = 1) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in hub_tensors().items()}


def test_single_and_sharded_load_the_same(tmp_path, tensors):
    cfg = ModelConfig.from_hf(CONFIG)
    write_checkpoint(tmp_path / "single", tensors)
    write_checkpoint(tmp_path / "sharded", tensors, shards=3)
    single, sharded = load_weights(tmp_path / "single", cfg), load_weights(tmp_path / "sharded", cfg)
    assert list(single) == [w.name for w in stored_weights(cfg)]
    for name in single:
        np.testing.assert_array_equal(single[name], sharded[name])
    np.testing.assert_array_equal(single["vision.patch_embed.weight"],
                                  tensors["visual.patch_embed.proj.weight"].reshape(8, -1))
    np.testing.assert_array_equal(single["text.layers.0.q.bias"], tensors["model.layers.0.self_attn.q_proj.bias"])


def test_tied_embeddings_reuse_the_table(tmp_path, tensors):
    tied = {**CONFIG, "tie_word_embeddings": True}
    del tensors["lm_head.weight"]
    write_checkpoint(tmp_path, tensors)
    (tmp_path / "config.json").write_text(json.dumps(tied))
    w = load_weights(tmp_path, ModelConfig.from_hf(tied))
    assert w["text.lm_head.weight"] is w["text.embed.weight"]


def test_missing_shard_is_named(tmp_path, tensors):
    write_checkpoint(tmp_path, tensors, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* missing"):
        load_weights(tmp_path, ModelConfig.from_hf(CONFIG))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((20, 16), np.float32)
    write_checkpoint(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight .* \[20, 16\] .* \[24, 16\]"):
        load_weights(tmp_path, ModelConfig.from_hf(CONFIG))


def test_missing_tensor_and_missing_files(tmp_path, tensors):
    del tensors["model.norm.weight"]
    write_checkpoint(tmp_path / "a", tensors)
    with pytest.raises(CheckpointError, match="1 tensors missing .* text.norm.weight"):
        load_weights(tmp_path / "a", ModelConfig.from_hf(CONFIG))
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_weights(tmp_path / "b", ModelConfig.from_hf(CONFIG))


def test_truncated_file_is_reported(tmp_path, tensors):
    write_checkpoint(tmp_path, tensors)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(tmp_path, ModelConfig.from_hf(CONFIG))
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(tmp_path, ModelConfig.from_hf(CONFIG))
