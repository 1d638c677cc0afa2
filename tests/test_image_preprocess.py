"""Image preprocessing is bit-identical to transformers 4.57.1 `Qwen2VLImageProcessor`; loading errors are one line."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict

import media
import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessor
from transformers.image_utils import load_image as hf_load_image

from mindvl.errors import CheckpointError, MediaError
from mindvl.shapes.image import ProcessorConfig, load_image, preprocess_images

CFG = ProcessorConfig()


def reference(images, cfg: ProcessorConfig = CFG, **kwargs):
    out = Qwen2VLImageProcessor(**asdict(cfg))(images=images, **kwargs)
    return out["pixel_values"], out["image_grid_thw"]


def assert_identical(images, cfg: ProcessorConfig = CFG) -> np.ndarray:
    """Compare with transformers; returns our image_grid_thw."""
    ours, our_grid = preprocess_images(images, cfg)
    theirs, their_grid = reference(images, cfg)
    assert ours.dtype == np.float32 and our_grid.dtype == np.int64
    assert np.array_equal(our_grid, their_grid)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    return our_grid


@pytest.mark.parametrize(
    "height, width",
    [
        (224, 224),  # already a multiple of 28
        (100, 333),  # not multiples of 28
        (37, 53),  # below min_pixels: scaled up
        (10, 10),
        (30, 900),  # aspect ratio 30
        (900, 30),
        (281, 199),
    ],
)
def test_sizes_match_transformers(height: int, width: int) -> None:
    assert_identical([media.sample_image(height, width, seed=height * width)])


def test_above_max_pixels_is_scaled_down_identically() -> None:
    cfg = ProcessorConfig(max_pixels=300 * 28 * 28)
    grid = assert_identical([media.sample_image(1500, 2000, seed=1)], cfg)
    assert grid[0, 1] * grid[0, 2] * 14 * 14 <= cfg.max_pixels


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_other_modes_are_converted_to_rgb(mode: str) -> None:
    image = media.sample_image(61, 87, seed=3, mode=mode)
    assert image.mode == mode
    assert_identical([image])


def test_several_images_in_one_call() -> None:
    images = [media.sample_image(64, 64, 4), media.sample_image(300, 120, 5), media.sample_image(57, 400, 6)]
    assert assert_identical(images).shape == (3, 3)


def test_numpy_input_matches_pil_input() -> None:
    image = media.sample_image(90, 150, seed=7)
    assert_identical([np.asarray(image)])
    assert np.array_equal(preprocess_images([np.asarray(image)], CFG)[0], preprocess_images([image], CFG)[0])


def test_non_default_config_matches() -> None:
    cfg = ProcessorConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, image_mean=(0.5, 0.5, 0.5),
                          image_std=(0.5, 0.5, 0.5), resample=Image.Resampling.BILINEAR.value)
    assert_identical([media.sample_image(200, 500, seed=8)], cfg)


def test_one_or_three_pixel_high_image_is_read_as_hwc() -> None:
    # transformers would guess channels-first for a (3, W, 3) array; told the layout, it agrees with us.
    image = media.sample_image(3, 300, seed=9)
    ours, grid = preprocess_images([image], CFG)
    theirs, their_grid = reference([image], input_data_format="channels_last")
    assert np.array_equal(grid, their_grid) and np.array_equal(ours, theirs)


def test_extreme_aspect_ratio_is_a_media_error() -> None:
    image = media.sample_image(20, 5000, seed=10)
    with pytest.raises(ValueError, match="aspect ratio"):
        reference([image])
    with pytest.raises(MediaError, match="aspect ratio") as err:
        preprocess_images([image], CFG)
    assert "\n" not in str(err.value)


def test_wrong_array_is_a_media_error() -> None:
    with pytest.raises(MediaError, match="uint8"):
        preprocess_images([np.zeros((50, 50, 3), np.float32)], CFG)


# --- config ---


def test_config_from_dir_matches_transformers(tmp_path) -> None:
    d = {"min_pixels": 1000, "max_pixels": 50000, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2],
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor", "patch_size": 14}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    cfg = ProcessorConfig.from_dir(tmp_path)
    hf = Qwen2VLImageProcessor.from_pretrained(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.min_pixels, hf.max_pixels) == (1000, 50000)
    assert list(cfg.image_mean) == hf.image_mean and list(cfg.image_std) == hf.image_std
    assert cfg.rescale_factor == hf.rescale_factor and cfg.resample == hf.resample


def test_config_accepts_size_and_prefers_min_max_pixels() -> None:
    size_only = ProcessorConfig.from_dict({"size": {"shortest_edge": 2000, "longest_edge": 60000}})
    assert (size_only.min_pixels, size_only.max_pixels) == (2000, 60000)
    both = ProcessorConfig.from_dict({"size": {"shortest_edge": 2000, "longest_edge": 60000}, "max_pixels": 70000})
    assert (both.min_pixels, both.max_pixels) == (2000, 70000)


def test_config_from_dir_without_the_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="preprocessor_config.json") as err:
        ProcessorConfig.from_dir(tmp_path)
    assert "\n" not in str(err.value)


# --- loading ---


def assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_load_image_matches_transformers_including_exif_rotation(tmp_path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    media.sample_image(40, 70, seed=11).save(path, exif=exif, quality=95)
    ours = load_image(path)
    assert ours.mode == "RGB" and ours.size == (40, 70)
    assert np.array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_load_image_converts_to_rgb(tmp_path, mode: str) -> None:
    path = tmp_path / f"{mode}.png"
    media.sample_image(30, 40, seed=12, mode=mode).save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(hf_load_image(str(path))))


def test_load_image_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(MediaError, match="not found") as err:
        load_image(path)
    assert_one_line_naming(err, path)


def test_load_image_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(MediaError, match="empty") as err:
        load_image(path)
    assert_one_line_naming(err, path)


def test_load_image_not_an_image(tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is text\nover two lines\n")
    with pytest.raises(MediaError, match="not an image") as err:
        load_image(path)
    assert_one_line_naming(err, path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_load_image_truncated(tmp_path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    media.sample_image(120, 160, seed=13).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MediaError, match="corrupt or truncated") as err:
        load_image(path)
    assert_one_line_naming(err, path)


def png_header(width: int, height: int) -> bytes:
    """A PNG cut off where its pixel data starts: the size is readable, the pixels are missing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr_chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + ihdr_chunk + struct.pack(">I", 1000) + b"IDAT"


def test_load_image_refuses_large_images_from_the_header(tmp_path) -> None:
    # The pixel data is missing: only a check made before decoding can report the size instead of truncation.
    path = tmp_path / "big.png"
    path.write_bytes(png_header(1000, 1000))
    with pytest.raises(MediaError, match="more than the 100000 allowed") as err:
        load_image(path, max_pixels_decoded=100_000)
    assert_one_line_naming(err, path)


@pytest.mark.parametrize("side", [10_000, 30_000])  # PIL's bomb warning (> ~89 MP), then its bomb error (> ~179 MP)
def test_load_image_turns_pil_bomb_checks_into_media_errors(tmp_path, side: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(MediaError, match="too large") as err:
        load_image(path, max_pixels_decoded=10**12)
    assert_one_line_naming(err, path)


@pytest.mark.parametrize("fmt", ["EPS", "TIFF", "PPM", "ICO"])
def test_only_the_accepted_formats_are_decoded_whatever_the_bytes_claim(tmp_path, monkeypatch, fmt: str) -> None:
    # PIL hands EPS to Ghostscript: its decoder must never be reached, however the file is named or labelled.
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    path = tmp_path / "image.png"
    if fmt == "EPS":
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    else:
        media.sample_image(16, 16, seed=1).save(path, format=fmt)
    with pytest.raises(MediaError, match=r"not an image in a format mindvl reads \(PNG, JPEG, WebP, GIF or BMP\)"):
        load_image(path)
    assert opened == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_the_accepted_formats_decode(tmp_path, fmt: str) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    media.sample_image(16, 24, seed=1).save(path, format=fmt)
    assert load_image(path).size == (24, 16)
