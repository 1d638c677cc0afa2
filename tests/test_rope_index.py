"""M-RoPE positions equal transformers 4.57.1 `Qwen2VLModel.get_rope_index` (called on a tiny real model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLModel

from mindvl.shapes.rope_index import decode_position_ids, rope_index

MERGE = 2


@pytest.fixture(scope="module")
def model() -> Qwen2VLModel:
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2,
                           spatial_merge_size=MERGE),
    )
    return Qwen2VLModel(config).eval()


def token_ids(model: Qwen2VLModel) -> dict[str, int]:
    c = model.config
    return dict(image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                vision_start_token_id=c.vision_start_token_id)


def prompt(model: Qwen2VLModel, *parts) -> list[int]:
    """Token ids from parts: an int is that many text tokens; ("image"|"video", (t, h, w)) is a visual block."""
    c, rng, ids = model.config, np.random.default_rng(len(parts)), []
    for part in parts:
        if isinstance(part, int):
            ids += rng.integers(10, 200, size=part).tolist()
        else:
            kind, (t, h, w) = part
            pad = c.image_token_id if kind == "image" else c.video_token_id
            ids += [c.vision_start_token_id] + [pad] * (t * h * w // MERGE**2) + [c.vision_end_token_id]
    return ids


def assert_matches(model, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
    def tensor(x):
        return None if x is None else torch.tensor(np.asarray(x), dtype=torch.long)

    with torch.no_grad():
        ref_pos, ref_delta = model.get_rope_index(
            tensor(input_ids), tensor(image_grid_thw), tensor(video_grid_thw), tensor(attention_mask)
        )
    pos, delta = rope_index(np.asarray(input_ids), image_grid_thw, video_grid_thw, attention_mask,
                            spatial_merge_size=MERGE, **token_ids(model))
    assert pos.dtype == np.int64 and delta.dtype == np.int64
    assert pos.shape == (3, *np.shape(input_ids)) and delta.shape == (len(input_ids), 1)
    assert np.array_equal(pos, ref_pos.numpy()) and np.array_equal(delta, ref_delta.numpy())
    return pos, delta


def test_text_only(model) -> None:
    assert_matches(model, [prompt(model, 9)])
    assert_matches(model, [prompt(model, 9)], attention_mask=[[0, 0, 1, 1, 1, 1, 1, 1, 1]])


def test_one_image(model) -> None:
    grid = [[1, 4, 6]]
    pos, delta = assert_matches(model, [prompt(model, 3, ("image", grid[0]), 5)], image_grid_thw=grid)
    assert delta[0, 0] < 0  # the image's 6 tokens span fewer positions than tokens


def test_two_images_of_different_sizes(model) -> None:
    grid = [[1, 4, 6], [1, 8, 2]]
    ids = prompt(model, 2, ("image", grid[0]), 1, ("image", grid[1]), 4)
    assert_matches(model, [ids], image_grid_thw=grid)


def test_video(model) -> None:
    grid = [[3, 4, 4]]
    assert_matches(model, [prompt(model, 2, ("video", grid[0]), 6)], video_grid_thw=grid)


def test_image_and_video(model) -> None:
    image, video = [[1, 6, 4]], [[2, 4, 8]]
    ids = prompt(model, 3, ("image", image[0]), ("video", video[0]), 5)
    assert_matches(model, [ids], image_grid_thw=image, video_grid_thw=video)


def test_video_before_image(model) -> None:
    image, video = [[1, 2, 2]], [[4, 2, 2]]
    ids = prompt(model, 1, ("video", video[0]), 2, ("image", image[0]), 1)
    assert_matches(model, [ids], image_grid_thw=image, video_grid_thw=video)


def test_batch_with_left_padding(model) -> None:
    grid = [[1, 4, 4], [1, 2, 6]]
    long = prompt(model, 4, ("image", grid[0]), 6)
    short = prompt(model, 1, ("image", grid[1]), 2)
    pad = len(long) - len(short)
    ids = [long, [0] * pad + short]
    mask = [[1] * len(long), [0] * pad + [1] * len(short)]
    assert_matches(model, ids, image_grid_thw=grid, attention_mask=mask)


def test_decode_positions_continue_after_the_prompt(model) -> None:
    grid = [[1, 4, 6]]
    ids = [prompt(model, 3, ("image", grid[0]), 5)]
    pos, delta = assert_matches(model, ids, image_grid_thw=grid)
    step = decode_position_ids(delta, cache_position=len(ids[0]))
    assert step.shape == (3, 1, 1) and np.all(step == pos.max() + 1)
