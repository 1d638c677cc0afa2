"""Host-side inputs of the vision graph: the 2-D rotary tables.

Both depend on the image grids (data), so they are numpy here and the graph only sees fixed-shape tensors.
Patches arrive in merge-window order (see `shapes.image`): for a 4x4 grid with merge 2 the sequence runs

    (0,0) (0,1) (1,0) (1,1) | (0,2) (0,3) (1,2) (1,3) | (2,0) (2,1) (3,0) (3,1) | ...

and each patch rotates by its (row, column) pair: the first half of the rotary dims by the row, the second
half by the column.
"""

from __future__ import annotations

import numpy as np


def patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, column) of every patch, [N, 2], in the order the patches are fed to the encoder."""
    out = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64):
        rows = np.arange(h)[:, None].repeat(w, 1)
        cols = np.arange(w)[None, :].repeat(h, 0)
        pos = np.stack([_window_order(rows, merge), _window_order(cols, merge)], -1)
        out.append(np.tile(pos, (t, 1)))
    return np.concatenate(out, 0)


def _window_order(a: np.ndarray, merge: int) -> np.ndarray:
    """[h, w] values, read merge window by merge window."""
    h, w = a.shape
    return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)


def vision_rotary(grid_thw: np.ndarray, head_dim: int, merge: int,
                  theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [N, head_dim] (float32) for the vision attention."""
    dim = head_dim // 2
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    pos = patch_positions(grid_thw, merge).astype(np.float32)
    freqs = (pos[:, :, None] * inv_freq[None, None, :]).reshape(len(pos), -1)
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
