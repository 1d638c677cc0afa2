"""One user turn → the model's inputs, as transformers' Qwen2VLProcessor returns them (numpy, batch 1).

Images, then videos, come before the text in the same user turn, and the model folder's own chat template
is applied with the generation prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image

from mindvl.errors import MediaError
from mindvl.shapes.image import ProcessorConfig, load_image, preprocess_images
from mindvl.shapes.prompt import Tokenizer, build_prompt, expand_vision_pads
from mindvl.shapes.video import load_video, preprocess_video

ImageInput = Union[str, Path, Image.Image, np.ndarray]
VideoInput = Union[str, Path, np.ndarray]


class Processor:
    def __init__(self, model_dir: Union[str, Path]) -> None:
        self.model_dir = Path(model_dir)
        self.config = ProcessorConfig.from_dir(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)

    def __call__(self, text: str, images: Sequence[ImageInput] = (),
                 videos: Sequence[VideoInput] = ()) -> dict[str, np.ndarray]:
        """input_ids and attention_mask [1, S], plus pixel_values/image_grid_thw and
        pixel_values_videos/video_grid_thw when there are images or videos."""
        out: dict[str, np.ndarray] = {}
        image_grid = video_grid = None
        if images:
            pictures = [self._media(i, lambda p: preprocess_images([load_image(p)], self.config),
                                    lambda a: preprocess_images([a], self.config)) for i in images]
            image_grid = np.concatenate([grid for _, grid in pictures])
            out.update(pixel_values=np.concatenate([p for p, _ in pictures]), image_grid_thw=image_grid)
        if videos:
            clips = [self._media(v, lambda p: preprocess_video(load_video(p), self.config),
                                 lambda a: preprocess_video(a, self.config)) for v in videos]
            video_grid = np.concatenate([grid for _, grid in clips])
            out.update(pixel_values_videos=np.concatenate([p for p, _ in clips]), video_grid_thw=video_grid)
        prompt = build_prompt(self.model_dir, text, len(images), len(videos))
        prompt = expand_vision_pads(prompt, image_grid, video_grid, self.config.merge_size)
        input_ids = self.tokenizer.encode(prompt)[None]
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), **out}

    @staticmethod
    def _media(item, from_path: Callable, from_data: Callable) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(item, (str, Path)):
            return from_data(item)
        try:
            return from_path(item)
        except MediaError as e:
            if str(item) in str(e):
                raise
            raise MediaError(f"{item}: {e}") from None
