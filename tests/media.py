"""Test media: the package's sample media, plus files that only tests need (broken ones)."""

from __future__ import annotations

from pathlib import Path

import av

from mindvl.samples import sample_image, video_frames, write_sample_video

__all__ = ["PROMPTS", "sample_image", "video_frames", "write_sample_video", "write_empty_video"]

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
