"""Host-side inputs of the text graphs: prompt embeddings, cache write positions and attention masks."""

from __future__ import annotations

import numpy as np


def place_visual(embeds: np.ndarray, input_ids: np.ndarray, token_id: int, features: np.ndarray) -> None:
    """Write visual features, in order, over the embeddings of the pad tokens `token_id` (in place)."""
    where = input_ids == token_id
    if int(where.sum()) != len(features):
        raise ValueError(f"prompt has {int(where.sum())} pad tokens for {len(features)} visual features")
    embeds[where] = features.astype(embeds.dtype, copy=False)


def attention_mask(key_valid: np.ndarray, query_positions: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
    """Additive mask [B, S, C]: query at cache slot p sees slots <= p that hold a real (non-padding) token.

    key_valid: [B, C] bool, which cache slots hold real tokens once this step has written its own.
    query_positions: [B, S] int, the cache slot each query token is written to.
    """
    slots = np.arange(key_valid.shape[1])
    visible = (slots[None, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :]
    return np.where(visible, 0, np.finfo(dtype).min).astype(dtype)
