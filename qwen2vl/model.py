"""Qwen2-VL in MindSpore: the vision and text cells, their single copy of the weights, and host glue.

`mode="graph"` runs the cells compiled (`mindspore.jit`), `mode="pynative"` runs the very same cells eagerly.
Everything data-dependent (embedding lookup, visual token placement, M-RoPE ids, masks) is host numpy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindvl.device import host_dtype, refuse_bfloat16_on_cpu, select_device, to_tensor, zeros
from mindvl.errors import UnsupportedError
from mindvl.qwen2vl.text import TextStep
from mindvl.qwen2vl.vision import VisionEncoder
from mindvl.qwen2vl.weights import load_weights
from mindvl.shapes.buckets import DTYPES
from mindvl.shapes.config import ModelConfig, read_config
from mindvl.shapes.graphs import kv_cache_specs
from mindvl.shapes.rope_index import decode_position_ids, rope_index
from mindvl.shapes.text_inputs import attention_mask, place_visual
from mindvl.shapes.vision_inputs import vision_rotary
from mindvl.shapes.weights import aliases, text_embed, weight_groups

MODES = ("graph", "pynative")


@dataclass
class Generation:
    token_ids: list[int]
    vision_ms: float
    prefill_ms: float  # embedding the prompt and the prefill step, vision excluded
    decode_ms: list[float] = field(default_factory=list)


class Qwen2VL:
    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], dtype: str = "float32",
                 device: str | None = None) -> None:
        if dtype not in DTYPES:
            raise UnsupportedError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        self.cfg, self.dtype, self.device = cfg, dtype, select_device(device)
        ms.set_context(mode=ms.PYNATIVE_MODE)
        # bfloat16 has no numpy type: the host keeps float32 copies and the device tensors are bfloat16.
        self.np_dtype = host_dtype(dtype)
        self.embed = np.ascontiguousarray(weights[text_embed(cfg.text).weight.name], dtype=self.np_dtype)
        tied = aliases(cfg.text)

        def device_tensor(name: str) -> Tensor:
            # Tied: the LM head is the host embedding table itself (to_tensor shares its memory).
            return to_tensor(self.embed if name in tied else weights[name], dtype)

        groups = weight_groups(cfg)
        self.vision_weights = tuple(device_tensor(w.name) for w in groups["vision"])
        self.text_weights = tuple(device_tensor(w.name) for w in groups["text"])
        self._vision: dict[int, VisionEncoder] = {}
        self._graphs: dict[int, Callable] = {}
        self._steps: dict[tuple[int, int], tuple[TextStep, tuple[Tensor, ...]]] = {}

    def text_step(self, batch: int, capacity: int) -> tuple[TextStep, tuple[Tensor, ...]]:
        """The decoder cell for one (batch, cache capacity) and its KV cache, made once and kept, like a bucket;
        prefill and decode are the same cell called with different sequence lengths."""
        key = (batch, capacity)
        if key not in self._steps:
            caches = tuple(zeros(c.shape, c.dtype) for c in kv_cache_specs(self.cfg, batch, capacity, self.dtype))
            self._steps[key] = (TextStep(self.cfg.text, batch, capacity), caches)
        return self._steps[key]

    def _run(self, cell: ms.nn.Cell, mode: str, *args: Tensor) -> np.ndarray:
        if mode not in MODES:
            raise UnsupportedError(f"mode {mode!r} is not supported; use 'graph' or 'pynative'")
        refuse_bfloat16_on_cpu(self.dtype, self.device)
        fn = cell
        if mode == "graph":
            # Cells live as long as the model (kept in self._vision / self._steps), so id() is stable.
            if id(cell) not in self._graphs:
                self._graphs[id(cell)] = ms.jit(cell)
            fn = self._graphs[id(cell)]
        return fn(*args).asnumpy()

    def _tensor(self, a: np.ndarray) -> Tensor:
        return to_tensor(a, self.dtype)

    def encode_vision(self, pixel_values: np.ndarray, grid_thw: np.ndarray, mode: str = "graph") -> np.ndarray:
        """Merged visual tokens [sum(t*h*w)/merge², hidden] for the patches of one or more images or videos,
        encoded one at a time (each in its own attention groups), as the exported graphs do."""
        v, out, start = self.cfg.vision, [], 0
        for grid in np.asarray(grid_thw).reshape(-1, 3):
            count = int(np.prod(grid))
            cos, sin = vision_rotary(grid[None], v.head_dim, v.spatial_merge_size)
            args = (self._tensor(pixel_values[start:start + count]), Tensor(cos), Tensor(sin))
            out.append(self._run(self.vision_cell(int(grid[0])), mode, *args, *self.vision_weights))
            start += count
        return np.concatenate(out)

    def vision_cell(self, groups: int) -> VisionEncoder:
        if groups not in self._vision:
            self._vision[groups] = VisionEncoder(self.cfg.vision, groups)
        return self._vision[groups]

    def embed_prompt(self, input_ids: np.ndarray, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                     video_grid_thw=None, mode: str = "graph") -> np.ndarray:
        embeds = self.embed[np.asarray(input_ids)]
        for pixels, grid, token in ((pixel_values, image_grid_thw, self.cfg.image_token_id),
                                    (pixel_values_videos, video_grid_thw, self.cfg.video_token_id)):
            if pixels is not None:
                place_visual(embeds, input_ids, token, self.encode_vision(pixels, grid, mode))
        return embeds

    def position_ids(self, input_ids: np.ndarray, image_grid_thw=None, video_grid_thw=None,
                     attention_mask_2d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        return rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask_2d,
                          image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                          vision_start_token_id=c.vision_start_token_id,
                          spatial_merge_size=c.vision.spatial_merge_size)

    def _step(self, step: tuple[TextStep, tuple[Tensor, ...]], embeds: np.ndarray, position_ids: np.ndarray,
              slots: np.ndarray, key_valid: np.ndarray, logits_index: np.ndarray, mode: str) -> np.ndarray:
        cell, caches = step
        args = (self._tensor(embeds), Tensor(position_ids.astype(np.int32)), Tensor(slots.astype(np.int32)),
                self._tensor(attention_mask(key_valid, slots, self.np_dtype)), Tensor(logits_index.astype(np.int32)))
        return self._run(cell, mode, *args, *caches, *self.text_weights)

    def logits(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None,
               image_grid_thw: np.ndarray | None = None, pixel_values_videos: np.ndarray | None = None,
               video_grid_thw: np.ndarray | None = None, attention_mask: np.ndarray | None = None,
               mode: str = "graph") -> np.ndarray:
        """Logits [batch, seq, vocab] (float32) of a full forward, inputs as transformers' processor gives them."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        b, s = input_ids.shape
        valid = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        embeds = self.embed_prompt(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mode)
        position_ids, _ = self.position_ids(input_ids, image_grid_thw, video_grid_thw, attention_mask)
        step = self.text_step(b, s)
        slots = np.broadcast_to(np.arange(s), (b, s))
        return self._step(step, embeds, position_ids, slots, valid, slots, mode)

    def generate(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None,
                 image_grid_thw: np.ndarray | None = None, pixel_values_videos: np.ndarray | None = None,
                 video_grid_thw: np.ndarray | None = None, max_new_tokens: int = 16, mode: str = "graph",
                 stop_ids: tuple[int, ...] | None = None) -> Generation:
        """Greedy decoding of one prompt (batch 1) with the KV cache: prefill once, then one token per step."""
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        s = input_ids.shape[1]
        stop_ids = (self.cfg.eos_token_id,) if stop_ids is None else stop_ids
        capacity = s + max_new_tokens
        step = self.text_step(1, capacity)
        key_valid = np.zeros((1, capacity), bool)
        key_valid[:, :s] = True

        start = time.perf_counter()
        embeds = self.embed_prompt(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mode)
        vision_done = time.perf_counter()
        position_ids, rope_deltas = self.position_ids(input_ids, image_grid_thw, video_grid_thw)
        logits = self._step(step, embeds, position_ids, np.arange(s)[None], key_valid, np.array([[s - 1]]), mode)
        out = Generation(token_ids=[], vision_ms=(vision_done - start) * 1e3,
                         prefill_ms=(time.perf_counter() - vision_done) * 1e3)
        for slot in range(s, capacity):
            token = int(logits[0, -1].argmax())
            out.token_ids.append(token)
            if token in stop_ids or slot == capacity - 1:
                break
            start = time.perf_counter()
            key_valid[:, slot] = True
            logits = self._step(step, self.embed[[[token]]], decode_position_ids(rope_deltas, slot),
                                np.array([[slot]]), key_valid, np.zeros((1, 1)), mode)
            out.decode_ms.append((time.perf_counter() - start) * 1e3)
        return out


def load(model_dir: str | Path, dtype: str = "float32", device: str | None = None) -> Qwen2VL:
    """Load a Hugging Face Qwen2-VL folder (config.json + safetensors) into MindSpore cells."""
    cfg = read_config(model_dir)
    return Qwen2VL(cfg, load_weights(model_dir, cfg), dtype, device)
