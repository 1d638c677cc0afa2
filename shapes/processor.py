"""One user turn → the model's inputs, as transformers' Qwen2VLProcessor returns them (numpy, batch 1).

Images, then videos, come before the text in the same user turn, and the model folder's own chat template
is applied with the generation prompt. Without buckets every image keeps the size the model's processor gives
it; with a bucket spec (the runtime's case) each image and video is resized to the bucket `shapes.buckets`
chooses, and the choice is reported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from mindvl.errors import MediaError
from mindvl.shapes.buckets import (BucketError, BucketSpec, ImageChoice, VideoChoice, choose_image_bucket,
                                   choose_video_bucket)
from mindvl.shapes.image import ProcessorConfig, load_image, patchify, preprocess_images
from mindvl.shapes.prompt import ChatTemplate, Tokenizer, expand_vision_pads, user_turn
from mindvl.shapes.video import load_video, preprocess_video, read_video

ImageInput = Union[str, Path, Image.Image, np.ndarray]
VideoInput = Union[str, Path, np.ndarray]


@dataclass(frozen=True)
class Visual:
    """One image or video, patchified: what one vision graph call consumes."""

    kind: str  # "image" | "video"
    pixels: np.ndarray  # [t*h*w, C*T*P*P] float32
    grid: np.ndarray  # [3] int64: t, h, w in patches
    choice: Optional[Union[ImageChoice, VideoChoice]]  # the bucket taken, when bucketed


@dataclass(frozen=True)
class Prepared:
    input_ids: np.ndarray  # [1, S] int64
    visuals: tuple[Visual, ...]  # images first, then videos, in prompt order

    def grid_thw(self, kind: str) -> Optional[np.ndarray]:
        """[n, 3] grids of the images (kind "image") or videos ("video"), None when there are none."""
        grids = [v.grid for v in self.visuals if v.kind == kind]
        return np.stack(grids) if grids else None

    def model_inputs(self) -> dict[str, np.ndarray]:
        """input_ids and attention_mask, plus pixel_values/image_grid_thw and pixel_values_videos/video_grid_thw."""
        out = {"input_ids": self.input_ids, "attention_mask": np.ones_like(self.input_ids)}
        for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
            if self.grid_thw(kind) is not None:
                out[pixels] = np.concatenate([v.pixels for v in self.visuals if v.kind == kind])
                out[grid] = self.grid_thw(kind)
        return out


def _named(item: object, load: Callable[[], tuple]) -> tuple:
    """Run `load`, making sure a media error (or a bucket that does not fit it) names the file it is about."""
    try:
        return load()
    except (MediaError, BucketError) as e:
        if not isinstance(item, (str, Path)) or str(item) in str(e):
            raise
        raise type(e)(f"{item}: {e}") from None


class Processor:
    def __init__(self, folder: Union[str, Path], buckets: Optional[BucketSpec] = None) -> None:
        """`folder` holds the tokenizer and preprocessor files (a model folder, or an artifact's tokenizer/)."""
        self.folder = Path(folder)
        self.config = ProcessorConfig.from_dir(self.folder)
        self.tokenizer = Tokenizer.from_dir(self.folder)
        self.buckets = buckets

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        """Read on first use (not every request), so a folder without one fails only when a prompt needs it."""
        return ChatTemplate(self.folder)

    def __call__(self, text: str, images: Sequence[ImageInput] = (),
                 videos: Sequence[VideoInput] = ()) -> dict[str, np.ndarray]:
        return self.prepare(text, images, videos).model_inputs()

    def prepare(self, text: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = ()) -> Prepared:
        return self.prepare_chat([user_turn(text, len(images), len(videos))], images, videos)

    def prepare_chat(self, messages: Sequence[dict], images: Sequence[ImageInput] = (),
                     videos: Sequence[VideoInput] = ()) -> Prepared:
        """A conversation in the chat template's form (see `ChatTemplate.render`); its {"type": "image"} and
        {"type": "video"} parts take `images` and `videos`, in order."""
        visuals = [_named(i, lambda i=i: self._image(i)) for i in images]
        visuals += [_named(v, lambda v=v: self._video(v)) for v in videos]
        pads = Prepared(np.zeros((1, 0), np.int64), tuple(visuals))
        prompt = self.chat_template.render(messages)
        prompt = expand_vision_pads(prompt, pads.grid_thw("image"), pads.grid_thw("video"), self.config.merge_size)
        return Prepared(self.tokenizer.encode(prompt)[None], tuple(visuals))

    def _fit_args(self) -> dict[str, int]:
        c = self.config
        return {"factor": c.factor, "min_pixels": c.min_pixels, "max_pixels": c.max_pixels}

    def _image(self, image: ImageInput) -> Visual:
        if isinstance(image, (str, Path)):
            image = load_image(image)
        if self.buckets is None:
            pixels, grid = preprocess_images([image], self.config)
            return Visual("image", pixels, grid[0], None)
        frame = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        choice = choose_image_bucket(frame.shape[0], frame.shape[1], self.buckets.images, **self._fit_args())
        pixels, grid = patchify(frame[None], choice.bucket.height, choice.bucket.width, self.config)
        return Visual("image", pixels, grid, choice)

    def _video(self, video: VideoInput) -> Visual:
        if self.buckets is None:
            frames = load_video(video) if isinstance(video, (str, Path)) else video
            pixels, grid = preprocess_video(frames, self.config)
            return Visual("video", pixels, grid[0], None)
        chosen: list[VideoChoice] = []

        def pick(total: int, native_fps: float, height: int, width: int) -> np.ndarray:
            # Frames without a rate (arrays, some containers: 0) are taken as already at the sampling rate.
            chosen.append(choose_video_bucket(total, native_fps, height, width, self.buckets.videos,
                                              **self._fit_args()))
            return chosen[-1].frame_indices

        if isinstance(video, (str, Path)):
            frames = read_video(video, pick)
        else:
            frames = np.asarray(video)[pick(len(video), 0.0, video.shape[1], video.shape[2])]
        bucket = chosen[-1].bucket
        pixels, grid = patchify(frames, bucket.height, bucket.width, self.config)
        return Visual("video", pixels, grid, chosen[-1])
