"""Our MindSpore Qwen2-VL against transformers' PyTorch Qwen2-VL on the same random checkpoint.

Tolerances (float32): logits max|Δ| ≤ 1e-4 × max|logit|, argmax equal at every position; the vision encoder
within the same relative bound; greedy tokens identical while the reference's top-2 margin stays > 1e-3.
Inputs come from transformers' own processor, so this isolates the model from our preprocessing.

Three random checkpoints: `tiny` (head_dim 16, GQA 2, M-RoPE [2, 3, 3]), `tiny-gqa3` (head_dim 32, GQA 3, tied
embeddings, [4, 6, 6]) and `real-dims`, the published head sizes: text head_dim 128 with [16, 24, 24] and vision
head_dim 80 (embed 1280, 16 heads), in one decoder layer and one vision block.
"""

import functools

import numpy as np
import pytest
from media import PROMPTS
from reference import hf_greedy, hf_inputs, hf_logits, hf_vision

from mindvl.qwen2vl import load

PRESETS = ("tiny", "tiny-gqa3", "real-dims")
MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@pytest.fixture(scope="module", params=PRESETS)
def model_dir(request, checkpoint):
    return checkpoint(request.param)


@functools.cache
def ours(model_dir):
    return load(model_dir)


@functools.cache
def reference_inputs(model_dir, kind):
    return hf_inputs(model_dir, **PROMPTS[kind])


def model_inputs(inputs):
    return {k: v for k, v in inputs.items() if k in MODEL_INPUTS}


def assert_close(actual, expected, rel=1e-4):
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert err <= rel * scale, f"max|Δ| {err:.3g} > {rel} × max|ref| {scale:.3g}"


@pytest.mark.parametrize("kind", PROMPTS)
def test_logits_match_reference(model_dir, kind):
    inputs = reference_inputs(model_dir, kind)
    expected = hf_logits(model_dir, inputs)
    actual = ours(model_dir).logits(**model_inputs(inputs), attention_mask=inputs["attention_mask"])
    assert actual.shape == expected.shape
    assert_close(actual, expected)
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("kind, pixels, grid", [("two_images", "pixel_values", "image_grid_thw"),
                                                 ("video", "pixel_values_videos", "video_grid_thw")])
def test_vision_encoder_matches_reference(model_dir, kind, pixels, grid):
    inputs = reference_inputs(model_dir, kind)
    expected = hf_vision(model_dir, inputs[pixels], inputs[grid])
    assert_close(ours(model_dir).encode_vision(inputs[pixels], inputs[grid]), expected)


@pytest.mark.parametrize("kind", PROMPTS)
def test_greedy_tokens_match_reference(model_dir, kind):
    inputs = reference_inputs(model_dir, kind)
    expected, margin = hf_greedy(model_dir, inputs, max_new_tokens=16)
    assert margin > 1e-3, "the reference itself nearly ties: the fixture's weights are not separating tokens"
    got = ours(model_dir).generate(**model_inputs(inputs), max_new_tokens=16)
    assert got.token_ids == expected[0].tolist()


@pytest.mark.parametrize("kind", ["text", "image_video"])
def test_graph_equals_pynative(model_dir, kind):
    model, inputs = ours(model_dir), model_inputs(reference_inputs(model_dir, kind))
    graph, eager = model.logits(**inputs, mode="graph"), model.logits(**inputs, mode="pynative")
    assert_close(eager, graph, rel=1e-5)
    greedy_graph = model.generate(**inputs, max_new_tokens=6, mode="graph")
    greedy_eager = model.generate(**inputs, max_new_tokens=6, mode="pynative")
    assert greedy_graph.token_ids == greedy_eager.token_ids
