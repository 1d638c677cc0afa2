"""Bucket specs (the static shapes an artifact is exported at) and which bucket an input takes.

A spec is YAML (keys in README.md, "Buckets"); named presets ship in `presets/NAME.yaml`.

Image rule: `shapes.fit` (the image's native size under the model's own pixel limits; the admissible bucket that
  keeps at least `fidelity_floor` of its tokens with the least waste + lost tokens). The image is then resized to
  the bucket; ImageChoice reports the scale, the aspect distortion, and the tokens wasted and lost.

Video rule, for a clip of `total_frames` frames of h x w pixels:
  (1) The candidates are the buckets with at most `total_frames` frames (frames are never invented).
  (2) want = how many frames sampling at `fps` keeps (`sample_frame_indices`, 4 to 768 frames).
  (3) Take the candidate frame count closest to `want`; ties go to more frames.
  (4) Among the buckets with that frame count, apply the image rule to the frame size.
  The frames kept are index[i] = i * total_frames // F.

Text rule, for a prompt whose first `reused` tokens are already in the cache (0 when nothing is reused):
  (1) the smallest batch bucket >= batch;
  (2) when a prefill bucket holds the rest of the prompt whole: among the (prefill S, cache C) pairs with S <= C,
      S >= the rest and C >= prompt + max_new_tokens, the smallest C, then the smallest S — one prefill call;
  (3) else, chunked prefill: the smallest cache C >= prompt + max_new_tokens, and the rest is prefilled in chunks of
      the largest prefill bucket <= C, the last chunk in the smallest prefill bucket that holds it.
  A batch that is already running keeps its cache C, and only the calls are chosen. Only a prompt and its new
  tokens beyond the largest cache are refused. This is the one place that decides: the runtime, the batcher and
  the server all call `choose_text_buckets`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import yaml

from mindvl.errors import MindVLError
from mindvl.shapes.fit import FIDELITY_FLOOR, Fit, best_fit
from mindvl.shapes.image import one_line, smart_resize
from mindvl.shapes.video import FPS, MAX_FRAMES, MIN_FRAMES, sample_frame_indices

TEMPORAL_PATCH = 2  # Qwen2-VL's vision encoder takes frames in pairs: a video's buckets have an even frame count
KEYS = ("images", "videos", "batch", "prefill", "cache", "dtype", "fidelity_floor", "tp")
DTYPES = ("float32", "float16", "bfloat16")
_EXAMPLES = {"images": "[224x224, 448x336]", "videos": "[{frames: 8, size: 224x224}]", "batch": "[1]",
             "prefill": "[128, 256]", "cache": "[1024, 2048]"}
_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


class BucketError(MindVLError):
    """A bucket spec is invalid, or an input fits no bucket of the artifact."""


@dataclass(frozen=True)
class ImageBucket:
    height: int
    width: int

    def __post_init__(self) -> None:
        _check_size(self.height, self.width, "images")

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def pixels(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class VideoBucket:
    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        _check_size(self.height, self.width, "videos")
        f = self.frames
        if isinstance(f, bool) or not isinstance(f, int) or f < 2 or f % 2:
            fix = f"{f - 1} or {f + 1}" if isinstance(f, int) and f > 2 else "e.g. 2 or 8"
            raise BucketError(
                f"videos: frames {f!r} must be an even number >= 2 (Qwen2-VL's temporal patch is 2 frames); use {fix}"
            )

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def pixels(self) -> int:
        """Per frame: the image rule compares frame sizes."""
        return self.height * self.width


@dataclass(frozen=True)
class BucketSpec:
    images: tuple[ImageBucket, ...]
    videos: tuple[VideoBucket, ...]
    batch: tuple[int, ...]
    prefill: tuple[int, ...]
    cache: tuple[int, ...]
    dtype: str = "float32"
    fidelity_floor: float = FIDELITY_FLOOR  # the share of its native tokens an image keeps when a bucket allows
    tp: int = 1  # tensor-parallel degree: the ranks (cards) the decoder is split over (shapes/parallel.py)

    def __post_init__(self) -> None:
        # Sorted and de-duplicated so that two specs with the same buckets compare equal.
        norm = {
            "images": sorted(set(self.images), key=lambda b: (b.pixels, b.height, b.width)),
            "videos": sorted(set(self.videos), key=lambda b: (b.frames, b.pixels, b.height, b.width)),
            **{key: _positive_ints(key, getattr(self, key)) for key in ("batch", "prefill", "cache")},
        }
        for key, value in norm.items():
            object.__setattr__(self, key, tuple(value))
        if self.dtype not in DTYPES:
            raise BucketError(f"dtype: {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        floor = self.fidelity_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise BucketError(f"fidelity_floor: {floor!r} must be a share of the native tokens between 0 and 1, "
                              f"e.g. fidelity_floor: {FIDELITY_FLOOR}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise BucketError(f"tp: {self.tp!r} must be a positive integer, the number of ranks (1: one card)")
        unusable = [s for s in self.prefill if s > self.cache[-1]]
        if unusable:
            raise BucketError(
                f"prefill: {unusable[0]} is longer than every cache (largest {self.cache[-1]}), so no graph could use "
                f"it; remove it, or add a cache bucket (cache: [..., {unusable[-1]}])"
            )

    @classmethod
    def from_dict(cls, d: Any, factor: int = 28) -> BucketSpec:
        """Parse and validate a YAML-shaped dict; image and frame sizes must be multiples of `factor`."""
        if not isinstance(d, dict):
            got = "nothing" if d is None else type(d).__name__
            raise BucketError(f"a bucket spec must be a mapping with keys {', '.join(KEYS)}; got {got}")
        for key in d:
            if key not in KEYS:
                close = difflib.get_close_matches(str(key), KEYS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise BucketError(f"unknown key {key!r} in bucket spec; {hint}known keys: {', '.join(KEYS)}")
        images = [ImageBucket(*_size(s, "images", factor)) for s in _list(d, "images", required=False)]
        videos = [_video(v, factor) for v in _list(d, "videos", required=False)]
        ints = {key: tuple(_list(d, key, required=True)) for key in ("batch", "prefill", "cache")}
        return cls(tuple(images), tuple(videos), dtype=d.get("dtype", "float32"),
                   fidelity_floor=d.get("fidelity_floor", FIDELITY_FLOOR), tp=d.get("tp", 1), **ints)

    @classmethod
    def from_yaml(cls, path: Union[str, Path], factor: int = 28) -> BucketSpec:
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            presets = ", ".join(cls.preset_names())
            raise BucketError(f"{path}: cannot read the bucket file ({e.strerror}); check the path, or use a preset "
                              f"({presets})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise BucketError(f"{path}: not valid YAML ({one_line(e)}); fix the syntax") from None
        try:
            return cls.from_dict(d, factor)
        except BucketError as e:
            raise BucketError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name: str) -> BucketSpec:
        if name not in cls.preset_names():
            raise BucketError(f"unknown bucket preset {name!r}; known presets: {', '.join(cls.preset_names())}")
        return cls.from_dict(yaml.safe_load((_PRESETS / f"{name}.yaml").read_text(encoding="utf-8")))

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(p.name[: -len(".yaml")] for p in _PRESETS.iterdir() if p.name.endswith(".yaml"))

    def to_dict(self) -> dict[str, Any]:
        # Empty image/video lists are left out: from_dict refuses an explicitly empty one.
        d: dict[str, Any] = {}
        if self.images:
            d["images"] = [b.name for b in self.images]
        if self.videos:
            d["videos"] = [{"frames": b.frames, "size": f"{b.height}x{b.width}"} for b in self.videos]
        if self.fidelity_floor != FIDELITY_FLOOR:  # the default is left out, as older specs and manifests have it
            d["fidelity_floor"] = self.fidelity_floor
        if self.tp != 1:  # likewise
            d["tp"] = self.tp
        return {**d, "batch": list(self.batch), "prefill": list(self.prefill), "cache": list(self.cache),
                "dtype": self.dtype}

    def prefill_cache_pairs(self) -> list[tuple[int, int]]:
        """Every (S, C) with S <= C: one prefill graph each, per batch size."""
        return [(s, c) for s in self.prefill for c in self.cache if s <= c]


_PRESETS = files("mindvl.shapes") / "presets"


def _list(d: dict, key: str, *, required: bool) -> list:
    if key not in d:
        if required:
            raise BucketError(f"bucket spec has no {key!r}; add it, e.g. {key}: {_EXAMPLES[key]}")
        return []
    value = d[key]
    if not isinstance(value, list):
        raise BucketError(f"{key}: {value!r} is not a list; write it as {key}: {_EXAMPLES[key]}")
    if not value and not required:  # batch/prefill/cache get the same check from BucketSpec itself
        raise BucketError(f"{key}: the list is empty; omit the key if the artifact takes none, or give some, "
                          f"e.g. {key}: {_EXAMPLES[key]}")
    return value


def _check_size(height: Any, width: Any, key: str) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise BucketError(f"{key}: {height!r}x{width!r} is not a size; use positive pixels, e.g. 224x224")


def _positive_ints(key: str, values: Sequence[Any]) -> list[int]:
    if not values:
        raise BucketError(f"{key}: the list is empty; give at least one, e.g. {key}: {_EXAMPLES[key]}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BucketError(f"{key}: {v!r} is not a positive integer; write e.g. {key}: {_EXAMPLES[key]}")
    return sorted(set(values))


def _size(text: Any, key: str, factor: int) -> tuple[int, int]:
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise BucketError(f"{key}: {text!r} is not HxW; write height x width in pixels, e.g. 448x336")
    h, w = int(match[1]), int(match[2])
    if h % factor or w % factor:
        near_h, near_w = (max(factor, round(n / factor) * factor) for n in (h, w))
        raise BucketError(f"{key}: {text} must be a multiple of {factor} on both sides (one merged vision patch); "
                          f"the nearest such size is {near_h}x{near_w}")
    return h, w


def _video(entry: Any, factor: int) -> VideoBucket:
    if not isinstance(entry, dict) or set(entry) != {"frames", "size"}:
        raise BucketError(f"videos: {entry!r} must have exactly the keys frames and size, "
                          "e.g. {frames: 8, size: 224x224}")
    return VideoBucket(entry["frames"], *_size(entry["size"], "videos", factor))


class _Resized:
    """What resizing `source` (h, w) to the bucket costs; `native` is what the model's processor alone would make of
    it (`shapes.fit`)."""

    bucket: Union[ImageBucket, VideoBucket]
    source: tuple[int, int]
    native: tuple[int, int]
    fit: Fit = field(compare=False, repr=False)

    @property
    def scale_y(self) -> float:
        return self.bucket.height / self.source[0]

    @property
    def scale_x(self) -> float:
        return self.bucket.width / self.source[1]

    @property
    def aspect_distortion(self) -> float:
        return (self.bucket.height / self.bucket.width) / (self.source[0] / self.source[1])

    @property
    def extra_pixel_fraction(self) -> float:
        """The share of the bucket's tokens that carry nothing the image has."""
        return float(self.fit.waste / self.fit.tokens)

    @property
    def groups(self) -> int:
        """Temporal groups the vision graph encodes, each as many tokens as one frame: 1 for an image."""
        return max(1, getattr(self.bucket, "frames", 1) // TEMPORAL_PATCH)

    @property
    def lost_tokens(self) -> float:
        """Native tokens (per frame, for a video) that the bucket cannot hold."""
        return float(self.fit.lost)

    def describe(self) -> str:
        sy, sx = f"{self.scale_y:.2f}", f"{self.scale_x:.2f}"
        scale = sy if sy == sx else f"y {sy}, x {sx}"
        lost = f", {self.lost_tokens:.0f} of {self.fit.native_tokens} native tokens lost" if self.fit.lost else ""
        return (f"{self.source[0]}x{self.source[1]} → bucket {self.bucket.name} (scale {scale}, "
                f"{self.extra_pixel_fraction:.0%} of tokens beyond native {self.native[0]}x{self.native[1]}{lost})")


@dataclass(frozen=True)
class ImageChoice(_Resized):
    bucket: ImageBucket
    source: tuple[int, int]
    native: tuple[int, int]
    fit: Fit = field(compare=False, repr=False)


@dataclass(frozen=True)
class VideoChoice(_Resized):
    bucket: VideoBucket
    source: tuple[int, int]
    native: tuple[int, int]
    fit: Fit = field(compare=False, repr=False)
    total_frames: int
    wanted_frames: int
    frame_indices: np.ndarray = field(compare=False, repr=False)

    def describe(self) -> str:
        return (f"{self.bucket.frames} of {self.total_frames} frames ({self.wanted_frames} at the sampling rate), "
                + super().describe())


@dataclass(frozen=True)
class TextChoice:
    batch: int
    prefill: int  # the length of the last (or only) prefill call
    cache: int
    padding_tokens: int  # prefill positions past the prompt, per sequence
    unused_cache: int  # cache slots left after prompt + max_new_tokens
    calls: tuple[int, ...] = ()  # the length of every prefill call, in order: more than one when chunked


def choose_image_bucket(
    height: int, width: int, buckets: Sequence[ImageBucket], *, factor: int, min_pixels: int, max_pixels: int,
    floor: float = FIDELITY_FLOOR,
) -> ImageChoice:
    """The image rule of the module docstring."""
    if not buckets:
        raise BucketError(f"this artifact has no image buckets; re-export with images: {_EXAMPLES['images']}")
    native = smart_resize(height, width, factor, min_pixels, max_pixels)
    bucket, fit = best_fit(buckets, (height, width), native, factor, floor)
    return ImageChoice(bucket, (height, width), native, fit)


def choose_video_bucket(
    total_frames: int, native_fps: float, height: int, width: int, buckets: Sequence[VideoBucket], *,
    factor: int, min_pixels: int, max_pixels: int, fps: float = FPS, floor: float = FIDELITY_FLOOR,
) -> VideoChoice:
    """The video rule of the module docstring."""
    if not buckets:
        raise BucketError(f"this artifact has no video buckets; re-export with videos: {_EXAMPLES['videos']}")
    fitting = [b for b in buckets if b.frames <= total_frames]
    if not fitting:
        smallest = min(buckets, key=lambda b: b.frames)
        even = total_frames - total_frames % 2
        fix = (f"add a bucket with at most {total_frames} frames (videos: [..., {{frames: {even}, size: "
               f"{smallest.height}x{smallest.width}}}]) and re-export" if even >= 2 else "pass it as an image instead")
        clip = f"{total_frames} frame{'s' * (total_frames != 1)}"
        raise BucketError(f"video has {clip}; the smallest video bucket ({smallest.name}) needs {smallest.frames} "
                          f"and frames are never repeated: {fix}")
    # No rate in the header: take the frames as already at the sampling rate, as load_video does.
    want = len(sample_frame_indices(total_frames, native_fps or fps, fps=fps, min_frames=MIN_FRAMES,
                                    max_frames=MAX_FRAMES))
    frames = min({b.frames for b in fitting}, key=lambda f: (abs(f - want), -f))
    same = [b for b in fitting if b.frames == frames]
    native = smart_resize(height, width, factor, min_pixels, max_pixels)
    bucket, fit = best_fit(same, (height, width), native, factor, floor)
    indices = np.arange(frames, dtype=np.int64) * total_frames // frames
    return VideoChoice(bucket, (height, width), native, fit, total_frames, want, indices)


class TextBucketError(BucketError):
    """A prompt and its new tokens that no cache bucket holds: the numbers, for callers that word the refusal for
    their own audience (a server's client cannot re-export)."""

    def __init__(self, message: str, prompt_tokens: int, max_new_tokens: int, spec: BucketSpec) -> None:
        super().__init__(message)
        self.prompt_tokens, self.max_new_tokens, self.largest_cache = prompt_tokens, max_new_tokens, spec.cache[-1]


def choose_text_buckets(prompt_tokens: int, max_new_tokens: int, spec: BucketSpec, batch: int = 1,
                        cache: int | None = None, reused: int = 0) -> TextChoice:
    """The text rule of the module docstring; `cache`: the cache bucket of a batch already running; `reused`:
    prompt tokens already in the cache."""
    if batch > spec.batch[-1]:
        raise BucketError(f"batch of {batch} sequences; the largest batch bucket is {spec.batch[-1]}: add it "
                          f"(batch: [..., {batch}]) to the bucket spec and re-export")
    total, rest = prompt_tokens + max_new_tokens, prompt_tokens - reused
    if prompt_tokens >= spec.cache[-1]:
        raise TextBucketError(
            f"prompt is {prompt_tokens} tokens, and the largest cache bucket ({spec.cache[-1]}) must hold it and its "
            f"new tokens: add a cache bucket (cache: [..., {_pow2(total)}]) and re-export, or shorten the prompt",
            prompt_tokens, max_new_tokens, spec)
    if total > spec.cache[-1]:
        raise TextBucketError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens, more than the "
            f"largest cache bucket {spec.cache[-1]}: lower max_new_tokens to <= {spec.cache[-1] - prompt_tokens}, "
            f"or add a cache bucket (cache: [..., {_pow2(total)}]) and re-export",
            prompt_tokens, max_new_tokens, spec)
    caches = [c for c in spec.cache if c >= total and spec.prefill[0] <= c and (cache is None or c == cache)]
    if not caches:
        raise BucketError(f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens does not fit the running "
                          f"batch's {cache}-slot cache; wait for a batch with a larger cache")
    whole = [(s, c) for s, c in spec.prefill_cache_pairs() if s >= rest and c in caches]
    if whole:
        s, c = min(whole, key=lambda sc: (sc[1], sc[0]))
        calls = (s,)
    else:
        c = caches[0]
        chunk = max(s for s in spec.prefill if s <= c)
        full = (rest - 1) // chunk
        calls = (chunk,) * full + (min(s for s in spec.prefill if s >= rest - full * chunk),)
    b = min(x for x in spec.batch if x >= batch)
    return TextChoice(b, calls[-1], c, sum(calls) - rest, c - total, calls)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
