"""Host-side inputs of the text graphs: prompt embeddings, cache write positions and attention masks."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def place_visual(embeds: np.ndarray, input_ids: np.ndarray, token_id: int, features: np.ndarray) -> None:
    """Write visual features, in order, over the embeddings of the pad tokens `token_id` (in place)."""
    where = input_ids == token_id
    if int(where.sum()) != len(features):
        raise ValueError(f"prompt has {int(where.sum())} pad tokens for {len(features)} visual features")
    embeds[where] = features.astype(embeds.dtype, copy=False)


def visual_positions(input_ids: np.ndarray, token_id: int, counts: Sequence[int]) -> list[np.ndarray]:
    """The prompt positions of each visual's pad tokens (`token_id`), in order, `counts[k]` for the k-th visual."""
    where = np.flatnonzero(input_ids == token_id)
    if len(where) != sum(counts):
        raise ValueError(f"prompt has {len(where)} pad tokens for {sum(counts)} visual tokens")
    return np.split(where, np.cumsum(counts)[:-1]) if counts else []


def content_keys(input_ids: np.ndarray, visuals: Sequence[tuple[np.ndarray, str]]) -> np.ndarray:
    """int64 [S]: what each prompt position holds, for prefix reuse. A text token is its id; a visual's pad is a
    negative key made from the visual's digest and the pad's place in it, so two prompts share a prefix through an
    image only where the same image (the same bytes, fitted to the same bucket) stands. `visuals`: (positions,
    digest) of each visual."""
    keys = np.asarray(input_ids, dtype=np.int64).copy()
    for positions, digest in visuals:
        base = int(digest[:15], 16)  # 60 bits
        keys[positions] = -1 - (base + np.arange(len(positions), dtype=np.int64)) % (1 << 62)
    return keys


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading keys `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def attention_mask(key_valid: np.ndarray, query_positions: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
    """Additive mask [B, S, C]: query at cache slot p sees slots <= p that hold a real (non-padding) token.

    key_valid: [B, C] bool, which cache slots hold real tokens once this step has written its own.
    query_positions: [B, S] int, the cache slot each query token is written to.
    """
    slots = np.arange(key_valid.shape[1])
    visible = (slots[None, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :]
    return np.where(visible, 0, np.finfo(dtype).min).astype(dtype)
