"""Image preprocessing on the host, bit-identical to transformers 4.57.1 `Qwen2VLImageProcessor` (the PIL one).

Per image, in the reference's order and dtypes:

    PIL .convert("RGB")  ->  uint8 [H, W, 3]
    PIL resize, bicubic, to smart_resize(H, W)          (multiples of patch_size * merge_size)
    x.astype(float64) * rescale_factor  ->  float32
    (x - mean) / std                                    (float32 mean and std)
    repeat the last frame up to temporal_patch_size frames, cut into patches, merge-window by merge-window
    ->  pixel_values float32 [t*h*w, 3 * temporal_patch_size * patch_size * patch_size], grid (t, h, w)

One deliberate difference: arrays are always read as [H, W, 3]. transformers guesses the channel axis and takes an
image 1 or 3 pixels high for channels-first, which scrambles it.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from mindvl.errors import CheckpointError, MediaError, MediaTooLargeError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Below PIL's own bomb limits (a warning past ~89 MP, an error at open past ~179 MP, both turned into a
# MediaError): this lower limit is checked from the header first.
MAX_DECODED_PIXELS = 8192 * 8192

# transformers refuses anything flatter than this; so do we, with our own error type.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ProcessorConfig:
    """The fields of `preprocessor_config.json` that change pixel values; defaults are transformers'."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC.value
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged patch."""
        return self.patch_size * self.merge_size

    def fit_args(self, floor: float) -> dict[str, float]:
        """The fit rules' keyword arguments (`choose_image_bucket`, `choose_video_bucket`) for this preprocessing."""
        return {"factor": self.factor, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "floor": floor}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessorConfig:
        """Keep the known keys of an HF preprocessor dict.

        Pixel bounds come from `min_pixels`/`max_pixels` (Qwen2-VL files) or `size.shortest_edge`/`longest_edge`
        (newer files); the former win when both are present, as in transformers. Note that the 4.57.1 slow
        processor ignores a `size`-only file and falls back to its defaults; we honour `size`, as the fast
        processor and transformers 5 do.
        """
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in known}
        size = d.get("size") or {}
        if "min_pixels" not in kept and "shortest_edge" in size:
            kept["min_pixels"] = size["shortest_edge"]
        if "max_pixels" not in kept and "longest_edge" in size:
            kept["max_pixels"] = size["longest_edge"]
        for key in ("image_mean", "image_std"):
            if key in kept:
                value = kept[key]
                kept[key] = tuple(float(v) for v in value) if isinstance(value, Sequence) else (float(value),) * 3
        return cls(**kept)

    @classmethod
    def from_dir(cls, model_dir: Union[str, Path]) -> ProcessorConfig:
        """Read `preprocessor_config.json` from an HF model folder (or an artifact's tokenizer folder)."""
        path = Path(model_dir) / "preprocessor_config.json"
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            message = f"{path}: file is missing; copy preprocessor_config.json from the HF model folder"
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            message = f"{path}: not valid JSON ({one_line(e)}); re-download it from the HF model folder"
        raise CheckpointError(message)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept as well as possible.

    A transcription of transformers' `smart_resize`, Python floats and banker's `round` included, so the sizes
    agree to the pixel.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(
            f"image of {width}x{height} pixels has aspect ratio {ratio:.0f} > {MAX_ASPECT_RATIO}, which Qwen2-VL "
            "cannot take; crop it or pad it closer to square"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# The formats mindvl decodes, whatever a file's name or a data: URL claims: PIL tries only these decoders, so
# bytes made to look like EPS (which PIL hands to Ghostscript), PSD or another exotic format never reach theirs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"

# EXIF orientation -> the transpose that makes the image upright (PIL's own `exif_transpose` table).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SIDEWAYS = (5, 6, 7, 8)

_Source = Union[Path, BinaryIO]


@dataclass(frozen=True)
class ImageHeader:
    """What an image will be once decoded and turned upright, read from its header alone."""

    height: int
    width: int
    orientation: int  # EXIF orientation, 1 when upright or unknown


def load_image(path: Union[str, Path], max_pixels_decoded: int = MAX_DECODED_PIXELS) -> Image.Image:
    """Decode an image file fully into an RGB PIL image, upright per its EXIF orientation (as transformers'
    `load_image` does).

    The pixel count is checked from the header before any pixel is decoded, so a small file that would expand to
    gigabytes (a decompression bomb) is refused cheaply. Truncated files fail here, not later: `.load()` is
    forced while the file is open (this relies on PIL's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`).
    """
    path = Path(path)
    require_file(path, "image")
    return decode_image(path, str(path), max_pixels_decoded)


def read_image_header(source: _Source, name: str, max_pixels_decoded: int = MAX_DECODED_PIXELS) -> ImageHeader:
    """The size the image will have once decoded and upright; refuses what `decode_image` would refuse for its
    header (format, pixel count) without decoding a pixel."""
    with _opened(source, name, max_pixels_decoded) as img:
        width, height = img.size
        orientation = _orientation(img)
    if orientation in _SIDEWAYS:
        height, width = width, height
    return ImageHeader(height, width, orientation)


def decode_image(source: _Source, name: str, max_pixels_decoded: int = MAX_DECODED_PIXELS) -> Image.Image:
    """`load_image` of a file or of an open binary stream (bytes a server received); errors call it `name`."""
    with _opened(source, name, max_pixels_decoded) as img:
        orientation = _orientation(img)
        img.load()
        upright = img.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else img
        return upright.convert("RGB")


@contextmanager
def _opened(source: _Source, name: str, max_pixels_decoded: int) -> Iterator[Image.Image]:
    """The image, opened by its header in one of IMAGE_FORMATS and within the pixel limit; PIL's failures here
    and in the caller's block become one-line MediaErrors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=IMAGE_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels_decoded:
                    raise MediaTooLargeError(
                        f"{name}: image is {width}x{height} = {width * height} pixels, more than the "
                        f"{max_pixels_decoded} allowed; downscale it first"
                    )
                yield img
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLargeError(f"{name}: image is too large to decode safely ({one_line(e)}); downscale it "
                                 f"first") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image in a format mindvl reads ({_FORMAT_NAMES}); convert it to PNG "
                         f"or JPEG") from None
    except Exception as e:  # PIL's decoders report corrupt data as OSError, SyntaxError, EOFError, zlib.error...
        message = f"{name}: image is corrupt or truncated ({one_line(e)}); re-export or re-download it"
        raise MediaError(message) from None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation found in the header. PNG may put its eXIf chunk after the pixel data, where only a
    full decode finds it: such a late orientation is ignored, so the size read from the header is the size
    decoded."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in _UPRIGHT else 1


def preprocess_images(
    images: Sequence[Union[Image.Image, np.ndarray]], cfg: ProcessorConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Images (PIL, or uint8 [H, W, 3] arrays) -> (pixel_values float32 [N, 3*T*P*P], image_grid_thw int64 [n, 3]).

    Each image is resized on its own and its patches follow the previous image's, as in transformers.
    """
    patches, grids = [], []
    for image in images:
        frame = rgb_array(image, cfg)
        height, width = frame.shape[:2]
        if cfg.do_resize:
            height, width = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        p, grid = patchify(frame[None], height, width, cfg)
        patches.append(p)
        grids.append(grid)
    patch_dim = 3 * cfg.temporal_patch_size * cfg.patch_size**2
    pixel_values = np.concatenate(patches) if patches else np.zeros((0, patch_dim), np.float32)
    return pixel_values, np.array(grids, dtype=np.int64).reshape(-1, 3)


def patchify(frames: np.ndarray, height: int, width: int, cfg: ProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [T, H, W, 3] frames, each resized to height x width -> (patches float32 [t*h*w, 3*T*P*P],
    grid int64 [3]): one image (T = 1) or one video."""
    pixels, grid = to_patches(np.stack([prepare_frame(f, height, width, cfg) for f in frames]), cfg)
    return pixels, np.array(grid, np.int64)


def patch_grid(frames: int, height: int, width: int, cfg: ProcessorConfig) -> np.ndarray:
    """The grid `patchify` gives `frames` frames resized to height x width, known before any is decoded."""
    return np.array((-(-frames // cfg.temporal_patch_size), height // cfg.patch_size, width // cfg.patch_size),
                    np.int64)


def prepare_frame(frame: np.ndarray, height: int, width: int, cfg: ProcessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> resized, rescaled, normalised float32 [height, width, 3]."""
    x = frame
    if cfg.do_resize:
        x = np.array(Image.fromarray(x).resize((width, height), resample=cfg.resample))
    if cfg.do_rescale:
        # The reference upcasts to float64 before scaling and only then casts down; float32 scaling differs in ulps.
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
        x = (x - np.array(cfg.image_mean, dtype=x.dtype)) / np.array(cfg.image_std, dtype=x.dtype)
    return x.astype(np.float32, copy=False)


def to_patches(frames: np.ndarray, cfg: ProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [T, H, W, C] -> (patches [t*h*w, C*tp*P*P], (t, h, w)).

    Patch rows run merge window by merge window (m x m neighbouring patches together), which is the order the
    vision encoder's patch merger expects. T is padded to a multiple of the temporal patch by repeating the last
    frame; a still image thus becomes two identical frames.
    """
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    x = frames.transpose(0, 3, 1, 2)
    if len(x) % tp:
        x = np.concatenate([x, np.repeat(x[-1:], tp - len(x) % tp, axis=0)])
    n, c, height, width = x.shape
    t, h, w = n // tp, height // p, width // p
    x = x.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * tp * p * p), (t, h, w)


def rgb_array(image: Union[Image.Image, np.ndarray], cfg: ProcessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image (converted to RGB) or of an array that already is one."""
    if isinstance(image, Image.Image) and cfg.do_convert_rgb and image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise MediaError(
            f"image must be RGB uint8 [H, W, 3], got {array.dtype} {array.shape}; pass a PIL image or convert the array"
        )
    return array


def require_file(path: Path, kind: str, name: str | None = None) -> None:
    """Refuse a missing or empty media file with one line naming it `name` (default: its path)."""
    name = name or str(path)
    if not path.is_file():
        raise MediaError(f"{name}: {kind} file not found; check the path")
    if path.stat().st_size == 0:
        raise MediaError(f"{name}: {kind} file is empty (0 bytes); re-export or re-download it")


def one_line(e: BaseException) -> str:
    """A library's exception text folded onto one line, for our one-line error messages."""
    return " ".join(str(e).split()) or type(e).__name__
