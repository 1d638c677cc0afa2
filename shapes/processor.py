"""One conversation → the model's inputs, as transformers' Qwen2VLProcessor returns them (numpy, batch 1).

Images, then videos, come before the text in the same user turn, and the model folder's own chat template
is applied with the generation prompt. Without buckets every image keeps the size the model's processor gives
it; with a bucket spec (the runtime's case) each image and video is resized to the bucket `shapes.buckets`
chooses, and the choice is reported.

Validate before spending: every image and video is first read by its header alone, its bucket chosen, and the
prompt's tokens counted; `check_length` may refuse the prompt then, before a single pixel is decoded.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from mindvl.errors import MediaError
from mindvl.shapes.buckets import (
    BucketError,
    BucketSpec,
    ImageChoice,
    VideoChoice,
    choose_image_bucket,
    choose_video_bucket,
)
from mindvl.shapes.image import (
    ProcessorConfig,
    decode_image,
    patch_grid,
    patchify,
    read_image_header,
    require_file,
    rgb_array,
    smart_resize,
)
from mindvl.shapes.prompt import ChatTemplate, Tokenizer, encode_chat, user_turn
from mindvl.shapes.video import (
    FPS,
    MAX_FRAMES,
    MIN_FRAMES,
    VideoHeader,
    read_video,
    read_video_header,
    sample_frame_indices,
)


@dataclass(frozen=True)
class MediaFile:
    """An image or video by its bytes (images only) or path, and the name errors call it by: a server names a
    client's upload so, never by a path of its own disk."""

    source: Union[Path, bytes]
    name: str


ImageInput = Union[str, Path, MediaFile, Image.Image, np.ndarray]
VideoInput = Union[str, Path, MediaFile, np.ndarray]


@dataclass(frozen=True)
class Visual:
    """One image or video, patchified: what one vision graph call consumes."""

    kind: str  # "image" | "video"
    pixels: np.ndarray  # [t*h*w, C*T*P*P] float32
    grid: np.ndarray  # [3] int64: t, h, w in patches
    choice: Optional[Union[ImageChoice, VideoChoice]]  # the bucket taken, when bucketed

    @functools.cached_property
    def digest(self) -> str:
        """What its vision graph is fed, hashed: equal for the same bytes fitted to the same bucket (the vision
        cache's and prefix reuse's notion of the same image)."""
        h = hashlib.blake2b(self.grid.tobytes(), digest_size=16)
        h.update(memoryview(np.ascontiguousarray(self.pixels)).cast("B"))
        return h.hexdigest()


@dataclass(frozen=True)
class Prepared:
    input_ids: np.ndarray  # [1, S] int64
    visuals: tuple[Visual, ...]  # images first, then videos, in prompt order

    def grid_thw(self, kind: str) -> Optional[np.ndarray]:
        """[n, 3] grids of the images (kind "image") or videos ("video"), None when there are none."""
        return _grids([v for v in self.visuals if v.kind == kind])

    def model_inputs(self) -> dict[str, np.ndarray]:
        """input_ids and attention_mask, plus pixel_values/image_grid_thw and pixel_values_videos/video_grid_thw."""
        out = {"input_ids": self.input_ids, "attention_mask": np.ones_like(self.input_ids)}
        for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
            if self.grid_thw(kind) is not None:
                out[pixels] = np.concatenate([v.pixels for v in self.visuals if v.kind == kind])
                out[grid] = self.grid_thw(kind)
        return out


@dataclass(frozen=True)
class _Planned:
    """An image or video fitted from its header: its grid is known, its pixels are not decoded yet."""

    kind: str
    item: object  # what the caller passed, to name it in errors
    size: tuple[int, int]  # height, width every frame is resized to
    grid: np.ndarray
    choice: Optional[Union[ImageChoice, VideoChoice]]
    frames: Callable[[], np.ndarray]  # decodes: uint8 [T, H, W, 3]


def _grids(visuals: Sequence[Union[Visual, _Planned]]) -> Optional[np.ndarray]:
    return np.stack([v.grid for v in visuals]) if visuals else None


def _named(item: object, load: Callable[[], object]) -> object:
    """Run `load`, making sure a media error (or a bucket that does not fit it) names the file it is about."""
    try:
        return load()
    except (MediaError, BucketError) as e:
        name = item.name if isinstance(item, MediaFile) else str(item) if isinstance(item, (str, Path)) else None
        if name is None or name in str(e):
            raise
        raise type(e)(f"{name}: {e}") from None


def _file(item: Union[str, Path, MediaFile], kind: str) -> tuple[Union[Path, bytes], str]:
    """(path or bytes, the name errors use) of a media file, checked to exist and not to be empty."""
    source, name = (item.source, item.name) if isinstance(item, MediaFile) else (Path(item), str(item))
    if isinstance(source, Path):
        require_file(source, kind, name)
    return source, name


def _stream(source: Union[Path, bytes]) -> Union[Path, io.BytesIO]:
    return io.BytesIO(source) if isinstance(source, bytes) else source


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

    def prepare(self, text: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
                check_length: Optional[Callable[[int], None]] = None) -> Prepared:
        return self.prepare_chat([user_turn(text, len(images), len(videos))], images, videos, check_length)

    def prepare_chat(self, messages: Sequence[dict], images: Sequence[ImageInput] = (),
                     videos: Sequence[VideoInput] = (),
                     check_length: Optional[Callable[[int], None]] = None) -> Prepared:
        """A conversation in the chat template's form (see `ChatTemplate.render`); its {"type": "image"} and
        {"type": "video"} parts take `images` and `videos`, in order. `check_length(prompt_tokens)` runs once the
        tokens are counted and before any pixel is decoded; it refuses the prompt by raising."""
        planned = [_named(i, lambda i=i: self._plan_image(i)) for i in images]
        planned += [_named(v, lambda v=v: self._plan_video(v)) for v in videos]
        input_ids = encode_chat(self.chat_template, self.tokenizer, messages,
                                _grids([p for p in planned if p.kind == "image"]),
                                _grids([p for p in planned if p.kind == "video"]), self.config.merge_size)
        if check_length is not None:
            check_length(len(input_ids))
        return Prepared(input_ids[None], tuple(_named(p.item, lambda p=p: self._decode(p)) for p in planned))

    def _decode(self, planned: _Planned) -> Visual:
        pixels, grid = patchify(planned.frames(), *planned.size, self.config)
        return Visual(planned.kind, pixels, grid, planned.choice)

    def _fit_args(self) -> dict[str, float]:
        return self.config.fit_args(self.buckets.fidelity_floor)

    def _native(self, height: int, width: int) -> tuple[int, int]:
        """The size the model's own processor resizes a frame to."""
        c = self.config
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels) if c.do_resize else (height, width)

    def _plan_image(self, image: ImageInput) -> _Planned:
        if isinstance(image, (Image.Image, np.ndarray)):
            frame = rgb_array(image, self.config)
            height, width = frame.shape[:2]
            frames = lambda: frame[None]  # noqa: E731
        else:
            source, name = _file(image, "image")
            header = read_image_header(_stream(source), name)
            height, width = header.height, header.width
            frames = lambda: rgb_array(decode_image(_stream(source), name), self.config)[None]  # noqa: E731
        choice = None
        if self.buckets is None:
            size = self._native(height, width)
        else:
            choice = choose_image_bucket(height, width, self.buckets.images, **self._fit_args())
            size = (choice.bucket.height, choice.bucket.width)
        return _Planned("image", image, size, patch_grid(1, *size, self.config), choice, frames)

    def _plan_video(self, video: VideoInput) -> _Planned:
        if isinstance(video, np.ndarray):
            array = _video_array(video)
            header = VideoHeader(len(array), 0.0, *array.shape[1:3])
            read = lambda pick: array[pick(len(array))]  # noqa: E731
        else:
            source, name = _file(video, "video")
            header = read_video_header(source, name)
            read = lambda pick: read_video(source, lambda total, *_: pick(total), name, header)  # noqa: E731
        if self.buckets is None:
            choice, size = None, self._native(header.height, header.width)
            # Arrays are taken whole; files are sampled at the model's frame rate, as transformers' load_video does.
            pick = np.arange if isinstance(video, np.ndarray) else lambda total: sample_frame_indices(
                total, header.fps or FPS, fps=FPS, min_frames=MIN_FRAMES, max_frames=MAX_FRAMES)
        else:
            # Frames without a rate (arrays, some containers: 0) are taken as already at the sampling rate.
            def fit(total: int) -> VideoChoice:
                return choose_video_bucket(total, header.fps, header.height, header.width, self.buckets.videos,
                                           **self._fit_args())

            choice = fit(header.total_frames)
            pick = lambda total: fit(total).frame_indices  # noqa: E731
            size = (choice.bucket.height, choice.bucket.width)
        count = len(pick(header.total_frames))

        def frames() -> np.ndarray:
            out = read(pick)
            if len(out) != count:  # the header promised frames that do not decode, and that changed the sampling
                raise MediaError(f"the video's header promises {header.total_frames} frames but fewer decode, which "
                                 f"changes how it is sampled; re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)")
            return out

        return _Planned("video", video, size, patch_grid(count, *size, self.config), choice, frames)


def _video_array(frames: np.ndarray) -> np.ndarray:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise MediaError(f"video frames must be RGB uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    return frames
