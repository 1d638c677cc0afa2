"""Qwen2-VL's published architectures and the tiny ones the tests and the demo build, as config.json dicts.

Test support: the package itself reads any config.json through `mindvl.shapes.config`, and never needs these.
"""

from __future__ import annotations

from typing import Any


def hub_config(arch: dict[str, Any]) -> dict[str, Any]:
    """config.json in the hub layout, as Qwen2-VL-2B-Instruct publishes it, with `arch` keys overriding."""
    vision = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
              "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              **arch.get("vision_config", {})}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "max_position_embeddings": 32768,
        "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
        "use_sliding_window": False, "use_cache": True, "attention_dropout": 0.0, "initializer_range": 0.02,
        "torch_dtype": "bfloat16", "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
        **arch, "vision_config": vision,
    }


# Architecture keys of the published Qwen2-VL-Instruct checkpoints; `hub_config` fills in the rest.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "2B": {},
    "7B": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_key_value_heads": 4, "tie_word_embeddings": False, "vision_config": {"hidden_size": 3584}},
    "72B": {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "max_window_layers": 80,
            "tie_word_embeddings": False, "vision_config": {"hidden_size": 8192}},
}
# config.json of each published checkpoint, as the hub has it.
HUB_CONFIGS: dict[str, dict[str, Any]] = {name: hub_config(arch) for name, arch in ARCHITECTURES.items()}

# Architecture keys of config.json (`hub_config` adds the rest). Tiny vocab sizes differ between presets so that
# code which hard-codes one fails loudly; each is the exact tokenizer size, so every id decodes.
FIXTURES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 320, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_hidden_layers": 2, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "tie_word_embeddings": False,
        "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
    },
    "tiny-gqa3": {
        "vocab_size": 400, "hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 1,
        "intermediate_size": 160, "num_hidden_layers": 2, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "tie_word_embeddings": True,
        "vision_config": {"depth": 2, "embed_dim": 48, "num_heads": 3, "hidden_size": 96},
    },
    # The published head sizes at small widths: text head_dim 128 (2 heads, 1 KV head) with M-RoPE [16, 24, 24],
    # vision head_dim 80 (embed 1280, 16 heads, as in every Qwen2-VL); one decoder layer, one vision block. Untied:
    # with one layer a tied head predicted the same token after every prompt, whatever attention did.
    "real-dims": {
        "vocab_size": 352, "hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 512, "num_hidden_layers": 1, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
        "vision_config": {"depth": 1, "embed_dim": 1280, "num_heads": 16, "hidden_size": 256},
    },
    "2b-shapes": ARCHITECTURES["2B"],
}  # fmt: skip
