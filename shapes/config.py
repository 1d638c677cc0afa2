"""Qwen2-VL configuration: one frozen dataclass per tower, read from either config.json layout.

The hub layout (Qwen2-VL-2B/7B/72B-Instruct as published) keeps the text settings at the top level with
`rope_scaling.mrope_section`; newer transformers write them under `text_config` with `rope_parameters`.
It lives in shapes/ because graph shapes derive from it and the runtime, which never imports the model
code, reads it back from the manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mindvl.errors import CheckpointError, UnsupportedError

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4
    hidden_size: int = 1536  # width of the merged visual tokens = the text model's hidden size
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        return self.embed_dim * self.spatial_merge_size**2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:
            d["in_channels"] = d["in_chans"]
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary pairs given to the temporal, height, width index
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any], tie_word_embeddings: bool | None) -> TextConfig:
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "mrope_section" in rope:
            d["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
        if "rope_theta" in rope and "rope_theta" not in d:
            d["rope_theta"] = rope["rope_theta"]
        if tie_word_embeddings is not None:
            d["tie_word_embeddings"] = tie_word_embeddings
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
            d["num_key_value_heads"] = d["num_attention_heads"]
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedError(
                f"model_type {model_type!r} is not supported: mindvl converts Qwen2-VL checkpoints "
                f"(model_type 'qwen2_vl'); point it at a Qwen2-VL model folder"
            )
        # Flat hub layout: the text settings are the top-level keys themselves.
        text_dict = d.get("text_config") or d
        tie = d.get("tie_word_embeddings", text_dict.get("tie_word_embeddings"))
        eos = d.get("eos_token_id", text_dict.get("eos_token_id", 151645))
        cfg = cls(
            text=TextConfig.from_hf(text_dict, tie),
            vision=VisionConfig.from_hf(d.get("vision_config") or {}),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            **{k: int(d[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if d.get(k) is not None},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        t, v = self.text, self.vision
        # The cells compute Qwen2-VL's activations whatever the config names: another one would be another model.
        for key, named, tower, computed in (("hidden_act", t.hidden_act, "text decoder", "silu"),
                                            ("vision_config.hidden_act", v.hidden_act, "vision encoder", "quick_gelu")):
            if named != computed:
                raise UnsupportedError(f"config.json: {key} {named!r} is not supported: mindvl's {tower} computes "
                                       f"{computed!r}, Qwen2-VL's, and would run a different model; use a Qwen2-VL "
                                       f"checkpoint, whose {key} is {computed!r}")
        problems = []
        if t.hidden_size % t.num_attention_heads:
            problems.append(f"hidden_size {t.hidden_size} is not divisible by num_attention_heads "
                            f"{t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {t.num_key_value_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            problems.append(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.embed_dim % v.num_heads or v.head_dim % 4:
            problems.append(f"vision embed_dim {v.embed_dim} / num_heads {v.num_heads} must give a head_dim "
                            f"divisible by 4 (2-D rotary)")
        if v.hidden_size != t.hidden_size:
            problems.append(f"vision_config.hidden_size {v.hidden_size} must equal the text hidden_size "
                            f"{t.hidden_size}")
        if problems:
            raise CheckpointError("config.json is inconsistent: " + "; ".join(problems) + "; fix the config")

    def to_dict(self) -> dict[str, Any]:
        """Nested layout that `from_hf` reads back unchanged (used in manifests)."""
        d = asdict(self)
        text = d.pop("text")
        text["rope_parameters"] = {"mrope_section": list(text.pop("mrope_section")),
                                   "rope_theta": text.pop("rope_theta")}
        return {"model_type": "qwen2_vl", "text_config": text, "vision_config": d.pop("vision"), **d}


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: pass a Hugging Face Qwen2-VL model folder (config.json + "
                              "*.safetensors)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or repair the file") from None
    return ModelConfig.from_hf(d)
