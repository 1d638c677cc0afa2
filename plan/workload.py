"""A workload sample, as shapes only: what `mindvl plan` chooses buckets for.

Three sources, one format (`Request`):
  - a JSONL file of OpenAI chat-completion request bodies (what a deployment logs): images and videos as data:
    URLs, or file paths (file:// or plain) relative to the file's folder; only their headers are read;
  - a JSONL file of `mindvl serve --log-shapes` lines (the two may be mixed: a line with "messages" is a body);
  - a folder of images and videos, each one request per prompt length of a distribution (`PromptLengths`).
Text tokens are counted through the model's chat template; visual tokens are left to the plan, which decides them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import unquote, urlparse

from mindvl.errors import MindVLError
from mindvl.shapes.image import ImageHeader, one_line, read_image_header
from mindvl.shapes.prompt import ChatTemplate, Tokenizer, text_tokens
from mindvl.shapes.video import read_video_header

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
DEFAULT_MAX_TOKENS = 256  # a body without max_tokens: what a chat answer typically asks for
DEFAULT_TEXT_TOKENS = 64  # a folder's requests: a question and the chat template around it


class WorkloadError(MindVLError):
    """A workload that cannot be read: the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Video:
    frames: int  # in the file
    height: int
    width: int
    fps: float  # 0 when the container does not say


@dataclass(frozen=True)
class Request:
    """One request's shapes. `text_tokens`: the prompt's tokens other than the visual ones (which the buckets
    decide); `weight`: how many requests of the sample it stands for."""

    images: tuple[tuple[int, int], ...]
    videos: tuple[Video, ...]
    text_tokens: int
    max_tokens: int
    weight: float = 1.0
    span: tuple[float, float] | None = None  # (arrival, end) in seconds, when a --log-shapes line says


@dataclass(frozen=True)
class PromptLengths:
    """Text tokens per request (the whole prompt but its visual tokens, chat template included), with their
    shares: "64" or "64:0.7,512:0.3"."""

    lengths: tuple[tuple[int, float], ...]

    @classmethod
    def parse(cls, text: str) -> PromptLengths:
        pairs = []
        try:
            for item in text.split(","):
                tokens, _, share = item.partition(":")
                pairs.append((int(tokens), float(share) if share else 1.0))
        except ValueError:
            pairs = []
        if not pairs or any(t < 1 or s <= 0 for t, s in pairs):
            raise WorkloadError(f"--prompt-tokens {text!r}: give text tokens per request with optional shares, e.g. "
                                f"64 or 64:0.7,512:0.3")
        total = sum(s for _, s in pairs)
        return cls(tuple((t, s / total) for t, s in pairs))


def read_workload(path: str | Path, tokenizer_dir: str | Path, prompt_lengths: PromptLengths | None = None,
                  max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Request]:
    """The requests of a workload file or folder (module docstring); `tokenizer_dir` counts text tokens."""
    path = Path(path)
    if path.is_dir():
        return _folder(path, prompt_lengths or PromptLengths(((DEFAULT_TEXT_TOKENS, 1.0),)), max_tokens)
    if not path.is_file():
        raise WorkloadError(f"workload {path} does not exist: pass a JSONL file of chat-completion request bodies or "
                            f"`mindvl serve --log-shapes` lines, or a folder of images and videos")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"workload {path} cannot be read ({one_line(e)}): pass a UTF-8 JSONL file") from None
    counter = _TextCounter(tokenizer_dir)
    requests = [_line(text, f"{path}:{n}", path.parent, counter, max_tokens)
                for n, text in enumerate(lines, 1) if text.strip()]
    if not requests:
        raise WorkloadError(f"workload {path} holds no requests: one JSON object per line, a chat-completion body "
                            f"or a `mindvl serve --log-shapes` line")
    return requests


class _TextCounter:
    """Text tokens of a conversation (`shapes.prompt.text_tokens`), with the folder's tokenizer read once."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        self.tokenizer = Tokenizer.from_dir(tokenizer_dir)
        self.template = ChatTemplate(tokenizer_dir)

    def __call__(self, messages: list[dict]) -> int:
        return text_tokens(self.tokenizer, self.template, messages)


def _line(text: str, where: str, folder: Path, count: _TextCounter, max_tokens: int) -> Request:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: not JSON ({e.msg}); each line must be one request object") from None
    if isinstance(d, dict) and isinstance(d.get("messages"), list):
        return _body(d, where, folder, count, max_tokens)
    if isinstance(d, dict) and {"images", "text_tokens", "max_tokens"} <= d.keys():
        return _logged(d, where)
    raise WorkloadError(f"{where}: neither a chat-completion request (no \"messages\" list) nor a "
                        f"`mindvl serve --log-shapes` line (images, videos, text_tokens, max_tokens); remove the line")


def _logged(d: dict[str, Any], where: str) -> Request:
    try:
        images = tuple((int(h), int(w)) for h, w in d["images"])
        videos = tuple(Video(int(v["frames"]), int(v["height"]), int(v["width"]), float(v.get("fps") or 0))
                       for v in d.get("videos", ()))
        span = (float(d["time"]), float(d["time"]) + float(d["duration_s"])) if "duration_s" in d else None
        request = Request(images, videos, int(d["text_tokens"]), int(d["max_tokens"]), span=span)
    except (TypeError, ValueError, KeyError) as e:
        raise WorkloadError(f"{where}: a --log-shapes line with a malformed field ({one_line(e)}); remove the "
                            f"line") from None
    for h, w in images:
        _check_size(h, w, where, "image")
    return request


def _body(d: dict[str, Any], where: str, folder: Path, count: _TextCounter, max_tokens: int) -> Request:
    images, videos, turns = [], [], []
    for message in d["messages"]:
        if not isinstance(message, dict):
            raise WorkloadError(f"{where}: a message is not an object; fix or remove the line")
        content = message.get("content")
        if not isinstance(content, list):
            turns.append({"role": message.get("role", "user"), "content": content or ""})
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                images.append(_image_size(_url(part, kind, where), where, folder))
                parts.append({"type": "image"})
            elif kind == "video_url":
                videos.append(_video(_url(part, kind, where), where, folder))
                parts.append({"type": "video"})
            elif kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            else:
                raise WorkloadError(f"{where}: a content part of type {kind!r}; only text, image_url and video_url "
                                    f"parts are planned for")
        turns.append({"role": message.get("role", "user"), "content": parts})
    asked = d.get("max_completion_tokens") or d.get("max_tokens") or max_tokens
    if not isinstance(asked, int) or asked < 1:
        raise WorkloadError(f"{where}: max_tokens {asked!r} is not a positive integer; fix the line")
    return Request(tuple(images), tuple(videos), count(turns), asked)


def _url(part: dict, kind: str, where: str) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise WorkloadError(f"{where}: an {kind} part without a url; fix the line")
    return url


def _media(url: str, where: str, folder: Path) -> tuple[bytes | Path, str]:
    """A data: URL's bytes, or a local file's path; never the network."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote(payload).encode()
        except (binascii.Error, ValueError):
            raise WorkloadError(f"{where}: a data: URL whose base64 does not decode; fix the line") from None
        return data, f"{where} (data: URL)"
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise WorkloadError(f"{where}: {url[:80]} is on the network, which the planner does not fetch; inline it as "
                            f"a data: URL, or plan from `mindvl serve --log-shapes` lines, which carry sizes only")
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise WorkloadError(f"{where}: media file {path} does not exist; paths are relative to the workload file")
    return path, str(path)


def _image_size(url: str, where: str, folder: Path) -> tuple[int, int]:
    source, name = _media(url, where, folder)
    header = _header(source, name, where)
    _check_size(header.height, header.width, where, "image")
    return header.height, header.width


def _header(source: bytes | Path, name: str, where: str) -> ImageHeader:
    try:
        return read_image_header(io.BytesIO(source) if isinstance(source, bytes) else source, name)
    except MindVLError as e:
        raise WorkloadError(f"{where}: {one_line(e)}") from None


def _video(url: str, where: str, folder: Path) -> Video:
    source, name = _media(url, where, folder)
    with _as_file(source) as path:
        try:
            header = read_video_header(path, name)
        except MindVLError as e:
            raise WorkloadError(f"{where}: {one_line(e)}") from None
    return Video(header.total_frames, header.height, header.width, header.fps)


@contextmanager
def _as_file(source: bytes | Path) -> Iterator[Path]:
    """A path for a video's bytes (containers are probed from files)."""
    if isinstance(source, Path):
        yield source
        return
    with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
        tmp.write(source)
        tmp.flush()
        yield Path(tmp.name)


def _check_size(height: int, width: int, where: str, kind: str) -> None:
    # Qwen2-VL's processor refuses an aspect ratio beyond 200 (smart_resize), so no bucket could take it.
    if height < 1 or width < 1 or max(height, width) / min(height, width) > 200:
        raise WorkloadError(f"{where}: {kind} of {height}x{width} pixels has an aspect ratio beyond 200:1, which "
                            f"Qwen2-VL's processor refuses; crop or pad it, or leave it out of the workload")


def _folder(folder: Path, lengths: PromptLengths, max_tokens: int) -> list[Request]:
    requests = []
    for path in _media_files(folder):
        where = str(path)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            header = _header(path, where, where)
            _check_size(header.height, header.width, where, "image")
            media = {"images": ((header.height, header.width),), "videos": ()}
        else:
            media = {"images": (), "videos": (_video(str(path), where, folder),)}
        requests += [Request(**media, text_tokens=t, max_tokens=max_tokens, weight=share)
                     for t, share in lengths.lengths]
    if not requests:
        raise WorkloadError(f"workload folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) or videos "
                            f"({', '.join(VIDEO_SUFFIXES)}): add some, or pass a JSONL file")
    return requests


def _media_files(folder: Path) -> Iterator[Path]:
    """Sorted, so that the same folder always gives the same workload (and plan)."""
    suffixes: Sequence[str] = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    yield from (p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes)


def batch_buckets(requests: list[Request], most: int = 8) -> tuple[int, ...]:
    """Batch buckets for the concurrency a logged workload shows: 1, and the power of two (at most `most`) that
    holds the requests in flight at 90 % of arrivals; (1,) when the sample has no timings."""
    spans = sorted(r.span for r in requests if r.span is not None)
    if not spans:
        return (1,)
    in_flight = sorted(sum(start <= t < end for start, end in spans) for t, _ in spans)
    busy = in_flight[min(len(in_flight) - 1, int(0.9 * len(in_flight)))]
    top = min(most, 1 << max(0, busy - 1).bit_length())
    return (1,) if top == 1 else (1, top)
