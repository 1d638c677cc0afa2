"""Config dataclasses read both config.json layouts and refuse what they cannot run."""

import json

import pytest

from mindvl.errors import CheckpointError, UnsupportedError
from mindvl.shapes.config import ModelConfig, read_config
from mindvl.testing.architectures import HUB_CONFIGS


def nested_layout(hub: dict) -> dict:
    """The layout newer transformers write: text settings under text_config, rope under rope_parameters."""
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act")
    text = {k: hub[k] for k in text_keys}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": hub["rope_theta"],
                               "mrope_section": hub["rope_scaling"]["mrope_section"]}
    vision = dict(hub["vision_config"])
    vision["in_channels"] = vision.pop("in_chans")
    return {"model_type": "qwen2_vl", "text_config": text, "vision_config": vision,
            "tie_word_embeddings": hub["tie_word_embeddings"],
            **{k: hub[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id", "eos_token_id")}}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_both_layouts_give_the_same_config(name):
    hub = ModelConfig.from_hf(HUB_CONFIGS[name])
    assert ModelConfig.from_hf(nested_layout(HUB_CONFIGS[name])) == hub
    assert ModelConfig.from_hf(hub.to_dict()) == hub


def test_published_shapes():
    two_b, seven_b, big = (ModelConfig.from_hf(HUB_CONFIGS[n]) for n in ("2B", "7B", "72B"))
    assert (two_b.text.head_dim, two_b.text.kv_groups, two_b.text.tie_word_embeddings) == (128, 6, True)
    assert (seven_b.text.hidden_size, seven_b.text.kv_groups, seven_b.text.tie_word_embeddings) == (3584, 7, False)
    assert (big.text.num_hidden_layers, big.vision.hidden_size) == (80, 8192)
    assert two_b.vision.patch_dim == 3 * 2 * 14 * 14 and two_b.vision.merged_dim == 4 * 1280
    assert two_b.text.mrope_section == (16, 24, 24) and two_b.text.rope_theta == 1e6


def test_unsupported_model_type_is_refused():
    with pytest.raises(UnsupportedError, match="qwen2_5_vl.*Qwen2-VL"):
        ModelConfig.from_hf({**HUB_CONFIGS["2B"], "model_type": "qwen2_5_vl"})


def test_mrope_sections_must_cover_the_head():
    bad = {**HUB_CONFIGS["2B"], "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}
    with pytest.raises(CheckpointError, match="mrope_section .* head_dim/2 = 64"):
        ModelConfig.from_hf(bad)


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS["7B"]))
    assert read_config(tmp_path).text.hidden_size == 3584


def activations(text: str, vision: str) -> dict:
    """The published 2B config.json, naming these activations."""
    hub = HUB_CONFIGS["2B"]
    return {**hub, "hidden_act": text, "vision_config": {**hub["vision_config"], "hidden_act": vision}}


@pytest.mark.parametrize("config, refusal", [
    (activations("gelu", "quick_gelu"), "hidden_act 'gelu' is not supported: mindvl's text decoder computes 'silu'"),
    (activations("silu", "gelu_pytorch_tanh"), "vision_config.hidden_act 'gelu_pytorch_tanh' is not supported: "
                                               "mindvl's vision encoder computes 'quick_gelu'"),
], ids=["text", "vision"])
def test_an_activation_the_cells_do_not_compute_is_refused(config, refusal):
    for layout in (config, nested_layout(config)):
        with pytest.raises(UnsupportedError) as refused:
            ModelConfig.from_hf(layout)
        message = str(refused.value)
        assert message.startswith(f"config.json: {refusal}") and "use a Qwen2-VL checkpoint" in message
        assert "\n" not in message


def test_the_activations_the_cells_compute_are_accepted():
    # The hub's vision_config names no activation: transformers' default, quick_gelu, is meant.
    assert "hidden_act" not in HUB_CONFIGS["2B"]["vision_config"]
    assert ModelConfig.from_hf(activations("silu", "quick_gelu")) == ModelConfig.from_hf(HUB_CONFIGS["2B"])
