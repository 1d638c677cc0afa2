"""`mindvl serve --log-shapes FILE`: one JSON line per chat completion that got as far as reading its media, with the
shapes it brought and the tokens it took, never its content (no text, no image bytes, no URLs, no file names), for
`mindvl plan` to choose buckets from:

    {"time": 1718000000.25, "duration_s": 1.5, "images": [[200, 120]],
     "videos": [{"frames": 8, "height": 112, "width": 112, "fps": 4.0}],
     "prompt_tokens": 71, "text_tokens": 23, "max_tokens": 16, "generated_tokens": 16}

`time` is the request's arrival (Unix seconds), `duration_s` from arrival to its last token (to its end when it
got none). Sizes are the source files' own, from their headers (an image upright, as it is decoded), before any
bucket; `fps` is the container's rate, 0 when it has none. `max_tokens` is what the request asked for, else the
server's default (what fits the largest cache). `text_tokens` is the prompt's tokens but its visual ones, which
the buckets decide (`shapes.prompt.text_tokens`): what a plan sizes the text buckets from. A request refused before
its prompt was counted (a video shorter than every bucket) has `prompt_tokens` 0.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mindvl.errors import MindVLError
from mindvl.shapes.image import read_image_header
from mindvl.shapes.processor import MediaFile
from mindvl.shapes.video import VideoHeader, read_video_header

log = logging.getLogger("mindvl.serve")


@dataclass(frozen=True)
class MediaShapes:
    images: tuple[tuple[int, int], ...]  # (height, width)
    videos: tuple[VideoHeader, ...]


def read_media_shapes(images: Sequence[MediaFile], videos: Sequence[MediaFile]) -> MediaShapes | None:
    """The shapes of a request's media from their headers; None when one cannot be read (the processor then refuses
    the request, saying why)."""
    try:
        sizes = tuple(_image_size(image) for image in images)
        headers = tuple(read_video_header(video.source, video.name) for video in videos)
    except MindVLError:
        return None
    return MediaShapes(sizes, headers)


def _image_size(image: MediaFile) -> tuple[int, int]:
    source = io.BytesIO(image.source) if isinstance(image.source, bytes) else image.source
    header = read_image_header(source, image.name)
    return header.height, header.width


class ShapeLog:
    """The log file, opened to append once at startup. Only the event loop writes, one line per write(2) on an
    unbuffered O_APPEND file, so lines never interleave and each is in the file, whole, when its request ends."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise MindVLError(f"--log-shapes {path}: cannot open it to append to ({e.strerror}); name a file in a "
                              "folder the server may write") from None
        self._file = open(fd, "ab", buffering=0)
        self._failing = False  # the last write failed: said once in the log, not once per request

    def write(self, *, time: float, duration_s: float, media: MediaShapes, prompt_tokens: int, text_tokens: int,
              max_tokens: int, generated_tokens: int) -> None:
        """Append one request's line; a failure to write goes to the server log and never to the client."""
        videos = [{"frames": v.total_frames, "height": v.height, "width": v.width, "fps": float(v.fps)}
                  for v in media.videos]
        line = json.dumps({"time": round(time, 6), "duration_s": round(duration_s, 6),
                           "images": [list(size) for size in media.images], "videos": videos,
                           "prompt_tokens": prompt_tokens, "text_tokens": text_tokens, "max_tokens": max_tokens,
                           "generated_tokens": generated_tokens}) + "\n"
        data = line.encode()
        try:
            written = self._file.write(data)
        except OSError as e:
            self._failed(e.strerror)
            return
        if written != len(data):
            self._failed(f"only {written} of {len(data)} bytes written")
            return
        self._failing = False

    def close(self) -> None:
        self._file.close()

    def _failed(self, reason: str | None) -> None:
        if not self._failing:
            log.error("--log-shapes %s: cannot write to it (%s); requests go on, unlogged until it can be written",
                      self.path, reason)
        self._failing = True
