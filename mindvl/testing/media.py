"""Deterministic sample media, made on the spot: the demo's inputs and the tests' (no downloads needed)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def sample_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A gradient with noise on top: smooth areas and sharp edges, so resampling filters show their differences."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([ys * 255 / max(height - 1, 1), xs * 255 / max(width - 1, 1), (ys + xs) % 256], -1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    pixels = np.clip(gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8)))
        return image
    if mode == "P":
        return image.quantize(colors=64)
    return image.convert(mode)


def video_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, height, width, 3]: a pattern that moves from frame to frame, plus fixed noise."""
    base = np.asarray(sample_image(height, width, seed), dtype=np.int16)
    frames = [np.roll(base, shift=3 * i, axis=1) + 8 * i for i in range(count)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def write_sample_video(
    path: Path, frames: int = 8, size: tuple[int, int] = (64, 96), fps: int = 4, codec: str = "libx264"
) -> Path:
    """Encode `video_frames(frames, *size)` at `fps`; sizes must be even (yuv420p). Returns `path`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for pixels in video_frames(frames, *size):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return path
