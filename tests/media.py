"""Test media: the package's sample media, plus files that only tests need (broken ones)."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import av

from mindvl.testing.media import sample_image, video_frames, write_sample_video

__all__ = ["PROMPTS", "b64", "png_bomb", "png_header_only", "sample_image", "video_frames", "write_sample_video",
           "write_empty_video"]

# One user turn of each kind the parity tests cover: images and frames small enough for fast tests.
PROMPTS = {
    "text": dict(text="Write a short poem about the sea."),
    "image": dict(text="Describe this image.", images=[sample_image(84, 112, seed=1)]),
    "two_images": dict(text="Compare the two pictures.",
                       images=[sample_image(84, 112, seed=2), sample_image(140, 56, seed=3)]),
    "video": dict(text="What happens in this video?", videos=[video_frames(4, 56, 84, seed=4)]),
    "image_video": dict(text="Does the picture appear in the video?",
                        images=[sample_image(56, 56, seed=5)], videos=[video_frames(4, 56, 56, seed=6)]),
}


def write_empty_video(path: Path) -> Path:
    """An AVI with a video stream and no frames (AVI keeps the stream header even when nothing is muxed)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path


def _png(width: int, height: int, bit_depth: int, colour_type: int, pixels: bytes | None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + (chunk(b"IDAT", pixels) if pixels else b"") + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) and that has no pixel data: decoding it fails, so a
    request that is answered about its size was judged by the header alone."""
    return _png(width, height, 8, 2, None)


def png_bomb() -> bytes:
    """A real 8000x8000 1-bit PNG of zeros: 8 KB on the wire, 64 megapixels (192 MB as RGB) once decoded."""
    side = 8000
    return _png(side, side, 1, 0, zlib.compress((b"\x00" + bytes(side // 8)) * side, 9))


def b64(data: bytes, media_type: str = "image/png") -> str:
    """A data: URL of `data`."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
