"""M-RoPE position ids of Qwen2-VL prompts: transformers 4.57.1 `Qwen2VLModel.get_rope_index`, in numpy.

Text moves all three axes (temporal, height, width) together. A visual block of t x h x w merged patches, after
text that ended at position p - 1, takes (p + frame group, p + row, p + column); the text after it resumes at one
past the largest position used so far. The temporal index is the frame-group number: the transformers 4.x rule
Qwen2-VL was trained with (transformers 5 computes video positions differently).

Example: `<vision_start> <image> x 4 <vision_end> x`, the image a 1 x 4 x 4 grid (1 x 2 x 2 once merged):

    token        vs   img  img  img  img   ve   x
    temporal      0    1    1    1    1     3   4
    height        0    1    1    2    2     3   4
    width         0    1    2    1    2     3   4

rope delta = max position + 1 - sequence length = 5 - 7 = -2; the token generated at cache position p gets p + delta
on all three axes (`decode_position_ids`).
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: Optional[np.ndarray],
    video_grid_thw: Optional[np.ndarray],
    attention_mask: Optional[np.ndarray] = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids int64 [3, B, S], rope_deltas int64 [B, 1]) for a batch of prompts.

    input_ids [B, S]; grids [n, 3] in (t, h, w) patches before merging, rows in prompt order across the whole
    batch; attention_mask [B, S] with 0 on padding (left padding in practice). Padding positions are set to 1,
    and rope_deltas are relative to the padded length S, as in transformers.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    if image_grid_thw is None and video_grid_thw is None:
        return _text_only(batch, length, attention_mask)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    grids = {
        image_token_id: _rows(image_grid_thw),
        video_token_id: _rows(video_grid_thw),
    }
    position_ids = np.ones((3, batch, length), dtype=np.int64)
    rope_deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        keep = mask[b] == 1
        positions = _row_positions(input_ids[b, keep], grids, vision_start_token_id, spatial_merge_size)
        position_ids[:, b, keep] = positions
        rope_deltas[b, 0] = positions.max() + 1 - length
    return position_ids, rope_deltas


def decode_position_ids(rope_deltas: np.ndarray, cache_position: int) -> np.ndarray:
    """int64 [3, B, 1]: M-RoPE position of the token written at `cache_position` (a text token: same on all axes)."""
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    return np.repeat((cache_position + deltas)[None], 3, axis=0)


def _row_positions(
    tokens: np.ndarray, grids: dict[int, Iterator[tuple[int, int, int]]], vision_start_token_id: int, merge: int
) -> np.ndarray:
    """[3, len(tokens)] positions of one unpadded prompt; consumes one grid row per visual block."""
    # A block is announced by vision_start followed by its first pad token; that pad token tells image from video.
    kinds = tokens[np.flatnonzero(tokens == vision_start_token_id) + 1]
    remaining = {kind: int((kinds == kind).sum()) for kind in grids}
    chunks, start, next_pos = [], 0, 0
    for _ in range(sum(remaining.values())):
        pending = [kind for kind, n in remaining.items() if n > 0]
        block_start = start + int(np.flatnonzero(np.isin(tokens[start:], pending))[0])
        kind = int(tokens[block_start])
        remaining[kind] -= 1
        t, h, w = next(grids[kind])
        h, w = h // merge, w // merge

        text = next_pos + np.arange(block_start - start)
        chunks.append(np.repeat(text[None], 3, axis=0))
        block = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
        chunks.append(block + next_pos + len(text))
        next_pos = int(chunks[-1].max()) + 1
        start = block_start + t * h * w
    text = next_pos + np.arange(len(tokens) - start)
    chunks.append(np.repeat(text[None], 3, axis=0))
    return np.concatenate(chunks, axis=1)


def _rows(grid_thw: Optional[np.ndarray]) -> Iterator[tuple[int, int, int]]:
    """Grid rows one at a time; a prompt with more blocks than rows fails on `next` with a clear message."""
    rows = np.zeros((0, 3), dtype=np.int64) if grid_thw is None else np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    yield from (tuple(int(v) for v in row) for row in rows)
    raise ValueError("input_ids hold more visual blocks than there are rows in the grid_thw arrays")


def _text_only(batch: int, length: int, attention_mask: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if attention_mask is None:
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        return np.repeat(positions[None], 3, axis=0), np.zeros((batch, 1), dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = mask.cumsum(-1) - 1
    positions[mask == 0] = 1
    return np.repeat(positions[None], 3, axis=0), positions.max(-1, keepdims=True) + 1 - length
