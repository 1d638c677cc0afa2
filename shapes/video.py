"""Video decoding and preprocessing on the host.

Reference: transformers 4.57.1 `Qwen2VLImageProcessor(videos=...)`. The dedicated `Qwen2VLVideoProcessor` needs
torchvision (importing it raises ImportError without it), so on a torchvision-free install the image processor's
video path is what transformers runs. Differences of `Qwen2VLVideoProcessor`, read from its 4.57.1 source:
  - it resizes with torchvision on tensors, not PIL, and fuses rescale and normalise in float32, so its pixel
    values differ from this path in the last bits;
  - without min/max pixels in the config its defaults are 128*28*28 .. 768*28*28 (images: 56*56 .. 1280*28*28);
  - it pads an odd frame count with `temporal_patch_size - 1` copies of the last frame (same result for 2).
Its `sample_frames` is the frame-count rule `sample_frame_indices` follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import av
import numpy as np

from mindvl.errors import MediaError
from mindvl.shapes.image import ProcessorConfig, one_line, patchify, require_file, smart_resize

# Qwen2-VL's video sampling: frames per second kept, and the bounds on how many.
FPS, MIN_FRAMES, MAX_FRAMES = 2.0, 4, 768


def load_video(path: Union[str, Path], *, fps: float = FPS, min_frames: int = MIN_FRAMES,
               max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Decode `fps` frames per second of video, uniformly spread, as uint8 RGB [T, H, W, 3]; see
    `sample_frame_indices` for the rule. T is even and at least 2."""

    def pick(total: int, native_fps: float, height: int, width: int) -> np.ndarray:
        # No rate in the header: take the frames as already at the requested rate.
        return sample_frame_indices(total, native_fps or fps, fps=fps, min_frames=min_frames, max_frames=max_frames)

    return read_video(path, pick)


@dataclass(frozen=True)
class VideoHeader:
    """What a video file holds, from its container header (frames counted by decoding when it does not say)."""

    total_frames: int
    fps: float  # 0 when the header has no rate
    height: int
    width: int


def read_video_header(path: Union[str, Path], name: str | None = None) -> VideoHeader:
    """The header of a video file; errors call it `name` (default: its path)."""
    path = Path(path)
    name = name or str(path)
    require_file(path, "video", name)
    total, native_fps, height, width = _probe(path, name)
    return VideoHeader(total or _count_frames(path, name), native_fps, height, width)


def read_video(path: Union[str, Path], pick: Callable[[int, float, int, int], np.ndarray], name: str | None = None,
               header: VideoHeader | None = None) -> np.ndarray:
    """The frames `pick(total_frames, native_fps, height, width)` selects, as uint8 RGB [T, H, W, 3].

    The frame count comes from the container header (`header`, when the caller has read it already); when the
    header promises frames that do not decode, the decodable frames are counted and `pick` is asked again with
    the true count. `pick` may raise (say, when no bucket fits the clip): its error reaches the caller unchanged.
    """
    path = Path(path)
    name = name or str(path)
    h = header or read_video_header(path, name)
    indices = pick(h.total_frames, h.fps, h.height, h.width)
    wanted = set(indices.tolist())
    frames = _decode(path, name, wanted)
    if len(frames) < len(wanted):  # the header promised frames that do not decode
        indices = pick(_count_frames(path, name), h.fps, h.height, h.width)
        frames = _decode(path, name, set(indices.tolist()))
    return np.stack([frames[i] for i in indices])


def sample_frame_indices(
    total: int, native_fps: float, *, fps: float, min_frames: int, max_frames: int, temporal_patch_size: int = 2
) -> np.ndarray:
    """Which of `total` frames (played at `native_fps`) to keep; int64, sorted.

        n = duration_seconds * fps, clamped to [min_frames, min(max_frames, total)]
        n = n rounded down to a multiple of temporal_patch_size, at least temporal_patch_size
        index[i] = floor(i * total / n)            for i in 0 .. n-1

    This is `Qwen2VLVideoProcessor.sample_frames` (4.57.1) with two fixes: a one-frame video is repeated instead
    of refused, and the indices are exact integers. It builds them with a float32 `arange`, which now and then
    overshoots to n + 1 indices, an odd count (190 of 11312 (total, fps) cases tried; the first n always agree).
    """
    if total < 1:
        raise ValueError(f"cannot sample from {total} frames")
    n = total / native_fps * fps
    n = min(max(n, min_frames), max_frames, total)
    n = max(temporal_patch_size, math.floor(n / temporal_patch_size) * temporal_patch_size)
    return np.arange(n, dtype=np.int64) * total // n


def preprocess_video(frames: np.ndarray, cfg: ProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB [T, H, W, 3] -> (pixel_values_videos float32 [t*h*w, 3*T*P*P], video_grid_thw int64 [1, 3]).

    Every frame is resized to smart_resize of the frame size; an odd T is padded with the last frame.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise MediaError(f"video frames must be RGB uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if cfg.do_resize:
        height, width = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    patches, grid = patchify(frames, height, width, cfg)
    return patches, grid[None]


# The containers mindvl opens, told by their first bytes, each with the FFmpeg demuxer that reads it. Naming the
# demuxer keeps FFmpeg from guessing: a playlist (HLS, concat) dressed up as a video would make it open other files
# or URLs, and exotic demuxers are attack surface a server does not need.
_CONTAINERS = (("mov", lambda head: head[4:8] == b"ftyp"),  # MP4, MOV, 3GP
               ("matroska", lambda head: head[:4] == b"\x1a\x45\xdf\xa3"),  # MKV, WebM
               ("avi", lambda head: head[:4] == b"RIFF" and head[8:12] == b"AVI "))


def _probe(path: Path, name: str) -> tuple[int, float, int, int]:
    """(frame count, frames per second, height, width) from the header; 0 for what the header does not say."""
    with _open(path, name) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return stream.frames, float(rate) if rate else 0.0, stream.codec_context.height, stream.codec_context.width


def _count_frames(path: Path, name: str) -> int:
    with _open(path, name) as container:
        count = sum(1 for _ in _frames(name, container))
    if count == 0:
        raise MediaError(f"{name}: video has no decodable frames; re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)")
    return count


def _decode(path: Path, name: str, wanted: set[int]) -> dict[int, np.ndarray]:
    """Frames at the `wanted` indices, stopping after the last one."""
    out = {}
    with _open(path, name) as container:
        for i, frame in enumerate(_frames(name, container)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
                if len(out) == len(wanted):
                    break
    return out


def _frames(name: str, container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    try:
        yield from container.decode(container.streams.video[0])
    except av.FFmpegError as e:
        raise MediaError(f"{name}: video is corrupt ({one_line(e)}); re-encode or re-download it") from None


def _open(path: Path, name: str) -> av.container.InputContainer:
    with path.open("rb") as f:
        head = f.read(12)
    demuxer = next((d for d, matches in _CONTAINERS if matches(head)), None)
    if demuxer is None:
        raise MediaError(f"{name}: not a video in a container mindvl reads (MP4/MOV, Matroska/WebM, AVI); convert "
                         "it to MP4 (H.264)")
    try:
        container = av.open(str(path), format=demuxer)
    except av.FFmpegError as e:
        raise MediaError(f"{name}: not a video FFmpeg can read ({one_line(e)}); convert it to MP4 (H.264)") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{name}: file has no video stream; pass a video file")
    return container
