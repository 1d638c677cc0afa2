"""transformers' PyTorch Qwen2-VL as the independent reference for parity tests (tests only).

Pinned to transformers 4.57.1 on purpose: 5.x computes different M-RoPE positions for videos, and the 4.x rule
is the one Qwen2-VL was trained with. Models load in float32 with eager attention, once per folder.

Qwen2VLProcessor cannot be built here as published: in 4.57 it requires Qwen2VLVideoProcessor, which imports
torchvision, and torchvision cannot be installed beside this CPU torch. So the processor below keeps all of
transformers' own processor code (chat template, pad expansion, tokenization, image preprocessing) and only
routes videos through Qwen2VLImageProcessor's video path, which 4.57 still ships: frames are resized with PIL
bicubic (not torchvision) and patchified exactly like images.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor


class _VideosThroughImageProcessor(Qwen2VLImageProcessor):
    def __call__(self, videos, **kwargs):
        return self.preprocess(images=None, videos=videos, **kwargs)


class _Processor(Qwen2VLProcessor):
    video_processor_class = "Qwen2VLImageProcessor"


@functools.cache
def _processor(model_dir: str) -> Qwen2VLProcessor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return _Processor(
        image_processor=Qwen2VLImageProcessor.from_pretrained(model_dir),
        tokenizer=tokenizer,
        video_processor=_VideosThroughImageProcessor.from_pretrained(model_dir),
        chat_template=tokenizer.chat_template,
    )


@functools.cache
def _model(model_dir: str) -> Qwen2VLForConditionalGeneration:
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_inputs(
    model_dir: str | os.PathLike, text: str, images: Sequence = (), videos: Sequence[np.ndarray] = ()
) -> dict[str, np.ndarray]:
    """Model inputs for one user turn: images (PIL or HxWx3 uint8), then videos ([T, H, W, 3] uint8), then text."""
    content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos) + [{"type": "text", "text": text}]
    return hf_chat_inputs(model_dir, [{"role": "user", "content": content}], images, videos)


def hf_chat_inputs(
    model_dir: str | os.PathLike, messages: Sequence[dict], images: Sequence = (), videos: Sequence[np.ndarray] = ()
) -> dict[str, np.ndarray]:
    """Model inputs for a whole conversation with the generation prompt: `messages` as the chat template takes them
    (content as lists of parts), whose {"type": "image"} and {"type": "video"} parts take `images` and `videos` in
    order."""
    processor = _processor(str(model_dir))
    prompt = processor.apply_chat_template(list(messages), add_generation_prompt=True)
    batch = processor(
        text=[prompt],
        images=list(images) or None,
        videos=[np.asarray(v) for v in videos] or None,
        return_tensors="np",
    )
    return {name: np.asarray(value) for name, value in batch.items()}


def _torch(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in inputs.items()}


@torch.inference_mode()
def hf_logits(model_dir: str | os.PathLike, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Logits [B, S, V] for every prompt position."""
    return _model(str(model_dir))(**_torch(inputs)).logits.numpy()


@torch.inference_mode()
def hf_vision(model_dir: str | os.PathLike, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
    """The visual encoder's merged output [sum(t*h*w) / merge^2, hidden] for flattened patches."""
    visual = _model(str(model_dir)).model.visual
    return visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(np.asarray(grid_thw))).numpy()


@torch.inference_mode()
def hf_greedy(
    model_dir: str | os.PathLike, inputs: dict[str, np.ndarray], max_new_tokens: int = 16
) -> tuple[np.ndarray, float]:
    """Greedy continuation [B, N] (stops early at the checkpoint's eos ids) and the smallest top-1 minus top-2
    logit gap over all steps: a gap near 0 means two implementations may legitimately pick different tokens."""
    out = _model(str(model_dir)).generate(
        **_torch(inputs),
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    top2 = torch.stack(out.logits, dim=1).topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    return out.sequences[:, inputs["input_ids"].shape[1] :].numpy(), margin
