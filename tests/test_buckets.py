"""Bucket specs, presets, validation messages and the selection rules, against hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from mindvl.errors import MindVLError
from mindvl.shapes.buckets import (
    BucketError,
    BucketSpec,
    ImageBucket,
    VideoBucket,
    choose_image_bucket,
    choose_text_buckets,
    choose_video_bucket,
)

# Qwen2-VL's processor defaults: one merged patch is 28 px; 56*56 = 3136 .. 28*28*1280 = 1003520 pixels.
PIXELS = dict(factor=28, min_pixels=3136, max_pixels=1003520)
DEFAULT = BucketSpec.preset("default")  # images 224x224 448x448 448x336 336x448 672x672; prefill 128..1024
TINY = BucketSpec.preset("tiny")
VIDEOS = [VideoBucket(4, 112, 112), VideoBucket(8, 224, 224), VideoBucket(8, 112, 112), VideoBucket(16, 224, 224)]


def image(h: int, w: int, buckets=DEFAULT.images, **kw):
    return choose_image_bucket(h, w, buckets, **{**PIXELS, **kw})


def video(total: int, fps: float, h: int = 240, w: int = 320, buckets=VIDEOS):
    return choose_video_bucket(total, fps, h, w, buckets, **PIXELS)


def raises(fn, *words: str) -> str:
    """Run fn, expect a one-line BucketError containing every word; return the message."""
    with pytest.raises(BucketError) as info:
        fn()
    message = str(info.value)
    assert isinstance(info.value, MindVLError) and "\n" not in message
    for word in words:
        assert word in message, (word, message)
    return message


# --- spec, presets, YAML --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "default", "bench-2b"])
def test_preset_round_trips(name: str, tmp_path) -> None:
    spec = BucketSpec.preset(name)
    assert BucketSpec.from_dict(spec.to_dict()) == spec
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert BucketSpec.from_yaml(path) == spec


def test_presets_hold_the_agreed_shapes() -> None:
    assert BucketSpec.preset_names() == ["bench-2b", "default", "tiny"]
    assert [b.name for b in TINY.images] == ["112x112", "168x224", "224x168", "224x224"]  # sorted by pixels
    assert [b.name for b in TINY.videos] == ["4x112x112"]
    assert (TINY.batch, TINY.prefill, TINY.cache, TINY.dtype) == ((1,), (64, 128, 256), (256, 512), "float32")
    assert {b.name for b in DEFAULT.images} == {"224x224", "448x448", "448x336", "336x448", "672x672"}
    assert (DEFAULT.prefill, DEFAULT.cache) == ((128, 256, 512, 1024), (1024, 2048))
    bench = BucketSpec.preset("bench-2b")
    # 4 vision + 1 video + (128, 512) x (1024, 2048) prefill + 2 decode = 11 graphs
    graphs = len(bench.images) + len(bench.videos) + len(bench.prefill_cache_pairs()) * len(bench.batch)
    assert graphs + len(bench.cache) * len(bench.batch) == 11


def test_spec_is_sorted_and_deduplicated() -> None:
    a = BucketSpec.from_dict({"images": ["448x336", "224x224", "448x336"], "batch": [4, 1, 1],
                              "prefill": [256, 128], "cache": [2048, 1024, 2048]})
    b = BucketSpec.from_dict({"images": ["224x224", "448x336"], "batch": [1, 4], "prefill": [128, 256],
                              "cache": [1024, 2048], "dtype": "float32"})
    assert a == b and a.batch == (1, 4) and a.videos == ()
    assert a.to_dict() == {"images": ["224x224", "448x336"], "batch": [1, 4], "prefill": [128, 256],
                           "cache": [1024, 2048], "dtype": "float32"}  # text/video keys absent, not empty


def test_prefill_cache_pairs_keep_s_at_most_c() -> None:
    spec = BucketSpec.from_dict({"prefill": [128, 512], "cache": [256, 1024], "batch": [1]})
    assert spec.prefill_cache_pairs() == [(128, 256), (128, 1024), (512, 1024)]  # (512, 256) cannot exist
    assert ImageBucket(448, 336).name == "448x336" and ImageBucket(448, 336).pixels == 150528
    assert VideoBucket(8, 224, 336).name == "8x224x336"


BASE = {"batch": [1], "prefill": [128], "cache": [1024]}


@pytest.mark.parametrize("change, words", [
    ({"prefil": [128]}, ["unknown key 'prefil'", "did you mean 'prefill'", "images, videos, batch, prefill"]),
    ({"images": ["224*224"]}, ["images", "'224*224'", "HxW", "448x336"]),
    ({"images": ["450x330"]}, ["images", "450x330", "28", "448x336"]),  # 450/28 = 16.07 -> 448, 330/28 = 11.8 -> 336
    ({"images": ["0x224"]}, ["images", "0x224", "positive"]),
    ({"images": []}, ["images", "empty", "omit the key"]),
    ({"videos": []}, ["videos", "empty", "omit the key"]),
    ({"videos": [{"frames": 7, "size": "224x224"}]}, ["frames 7", "even", "temporal patch", "6 or 8"]),
    ({"videos": [{"frames": 0, "size": "224x224"}]}, ["frames 0", "even", ">= 2"]),
    ({"videos": [{"frames": 8}]}, ["videos", "frames and size"]),
    ({"batch": [0]}, ["batch", "0", "positive integer"]),
    ({"prefill": [-128]}, ["prefill", "-128", "positive integer"]),
    ({"cache": ["1024"]}, ["cache", "'1024'", "positive integer"]),
    ({"batch": []}, ["batch", "empty", "batch: [1]"]),
    ({"prefill": 128}, ["prefill", "not a list", "prefill: [128, 256]"]),
    ({"prefill": [128, 4096], "cache": [1024, 2048]}, ["prefill: 4096", "every cache", "2048", "cache: [..., 4096]"]),
    ({"dtype": "fp32"}, ["dtype", "'fp32'", "float32, float16, bfloat16"]),
])
def test_spec_errors_are_one_line_with_the_fix(change: dict, words: list[str]) -> None:
    raises(lambda: BucketSpec.from_dict({**BASE, **change}), *words)


def test_missing_key_and_non_mapping() -> None:
    raises(lambda: BucketSpec.from_dict({"batch": [1], "prefill": [128]}), "no 'cache'", "cache: [1024, 2048]")
    raises(lambda: BucketSpec.from_dict([1, 2]), "mapping", "got list")


def test_yaml_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    raises(lambda: BucketSpec.from_yaml(missing), str(missing), "No such file", "tiny")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 224x224\n")
    raises(lambda: BucketSpec.from_yaml(listed), str(listed), "mapping")
    broken = tmp_path / "broken.yaml"
    broken.write_text("images: [224x224\n")
    raises(lambda: BucketSpec.from_yaml(broken), str(broken), "not valid YAML")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch: [1]\nprefill: [128]\ncache: [1024]\ndtype: int8\n")
    raises(lambda: BucketSpec.from_yaml(bad), str(bad), "'int8'")
    raises(lambda: BucketSpec.preset("huge"), "'huge'", "bench-2b, default, tiny")


# --- images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [TINY, DEFAULT, BucketSpec.preset("bench-2b")])
def test_exact_size_picks_its_own_bucket(spec: BucketSpec) -> None:
    for b in spec.images:
        choice = image(b.height, b.width, spec.images)
        assert choice.bucket == b and choice.native == (b.height, b.width)
        assert (choice.scale_y, choice.scale_x, choice.aspect_distortion, choice.extra_pixel_fraction) == (1, 1, 1, 0)


def test_portrait_and_landscape() -> None:
    # 400/28 = 14.3 -> 392, 300/28 = 10.7 -> 308: native 392x308 = 154 tokens (of 784 px each).
    # 448x336 (192 tokens) has exactly the 4:3 aspect: kept 154, waste 38, lost 0 -> cost 38. 448x448 (256 tokens,
    # stretch 4/3) keeps 192 -> 154 as well but wastes 102; 672x672 wastes more; 224x224 keeps 64 * 3/4 = 48 < 77,
    # half of 154: below the floor.
    portrait = image(400, 300)
    assert portrait.bucket.name == "448x336" and portrait.native == (392, 308)
    assert portrait.scale_y == portrait.scale_x == pytest.approx(1.12)  # 448/400, 336/300
    assert portrait.extra_pixel_fraction == pytest.approx(38 / 192) and portrait.lost_tokens == 0
    assert portrait.describe() == "400x300 → bucket 448x336 (scale 1.12, 20% of tokens beyond native 392x308)"
    assert image(300, 400).bucket.name == "336x448"


def test_640x480_photo() -> None:
    # 480/28 = 17.1 -> 476, 640/28 = 22.9 -> 644: native 391 tokens; the floor is 195.5.
    # 336x448 (3:4, 192 tokens) keeps 192 < 195.5 and 448x448 keeps 256 * 3/4 = 192: both below the floor.
    # 672x672 (576 tokens, stretch 4/3) keeps min(391, 432) = 391: admissible, waste 185.
    choice = image(480, 640)
    assert choice.bucket.name == "672x672" and choice.native == (476, 644)
    assert (choice.scale_y, choice.scale_x) == (pytest.approx(1.4), pytest.approx(1.05))  # 672/480, 672/640
    assert choice.aspect_distortion == pytest.approx(4 / 3)  # (672/672) / (480/640)
    assert choice.extra_pixel_fraction == pytest.approx(185 / 576) and choice.lost_tokens == 0
    # bench-2b has no bucket that keeps 195.5: the one that keeps the most, 336x448 (192, undistorted) over
    # 448x448 (192 too, more pixels).
    bench = image(480, 640, BucketSpec.preset("bench-2b").images)
    assert bench.bucket.name == "336x448" and bench.lost_tokens == 199
    assert bench.describe().endswith("199 of 391 native tokens lost)")


def test_the_floor_decides_between_losing_tokens_and_wasting_them() -> None:
    # A 448x448 image (256 tokens) between 336x336 (144 tokens: keeps 144, loses 112) and 672x672 (576 tokens:
    # wastes 320). At floor 0.5, 144 >= 128 and losing 112 costs less than wasting 320; at 0.6, 144 < 153.6.
    buckets = [ImageBucket(336, 336), ImageBucket(672, 672)]
    assert image(448, 448, buckets).bucket.name == "336x336"
    assert image(448, 448, buckets, floor=0.6).bucket.name == "672x672"
    assert image(448, 448, buckets, floor=0).bucket.name == "336x336"


def test_large_photo_below_every_bucket_takes_the_one_that_keeps_most() -> None:
    buckets = [ImageBucket(588, 588), ImageBucket(504, 672), ImageBucket(672, 504), ImageBucket(224, 224)]
    # beta = sqrt(3000*4000/1003520) = 3.4577; 3000/3.4577/28 = 31.0 -> 868 > ... smart_resize floors when over:
    # native 840x1148 = 1230 tokens, floor 615. 504x672 (3:4, 432 tokens) keeps 432; 588x588 keeps 441 * 3/4 =
    # 330.75; none reaches 615, so the one that keeps the most: 504x672, the photo's own aspect.
    choice = image(3000, 4000, buckets)
    assert choice.bucket.name == "504x672" and choice.native == (840, 1148)
    assert choice.scale_y == choice.scale_x == pytest.approx(0.168)  # 504/3000 = 672/4000
    assert choice.extra_pixel_fraction == 0 and choice.lost_tokens == 1230 - 432


def test_square_tie_goes_to_fewer_pixels() -> None:
    # 100/28 = 3.6 -> 112: 16 tokens; 224x224 wastes 48, 448x448 wastes 240.
    assert image(100, 100, [ImageBucket(448, 448), ImageBucket(224, 224)]).bucket.name == "224x224"
    # Two buckets of equal cost: 112x224 and 224x112 for a square 224x224 image (64 tokens), each keeping 32 of
    # 64 (exactly the floor) with no waste: fewer pixels tie too, the name decides.
    assert image(224, 224, [ImageBucket(224, 112), ImageBucket(112, 224)]).bucket.name == "112x224"


def test_tiny_image_is_upscaled_by_min_pixels() -> None:
    # 20x30 rounds to 28x28 = 784 < 3136: beta = sqrt(3136/600) = 2.2862; ceil(20*2.2862/28) = ceil(1.63) = 2 -> 56,
    # ceil(30*2.2862/28) = ceil(2.45) = 3 -> 84: 6 tokens. 112x112 (16 tokens, stretch 1.5) keeps
    # min(6, 16/1.5) = 6 and wastes 10; 168x224 (48 tokens, stretch 1.125) wastes 42.
    choice = image(20, 30, TINY.images)
    assert choice.native == (56, 84) and choice.bucket.name == "112x112"
    assert choice.extra_pixel_fraction == pytest.approx(10 / 16)


def test_min_pixels_beyond_every_bucket_is_served_and_reported() -> None:
    # min_pixels 40000: 100x100 -> 224x224 (64 tokens) natively; the only bucket, 112x112, keeps 16 of them.
    choice = image(100, 100, [ImageBucket(112, 112)], min_pixels=40000)
    assert choice.bucket.name == "112x112" and choice.native == (224, 224) and choice.lost_tokens == 48


def test_huge_aspect_ratio_is_squeezed_and_reported() -> None:
    # 100/28 = 3.6 -> 112, 2000/28 = 71.4 -> 1988: 284 tokens. The image is 1:20, so every bucket stretches it by
    # at least 15 (336x448): 672x672 keeps 576 / 20 = 28.8, the most, far below the floor of 142.
    choice = image(100, 2000)
    assert choice.bucket.name == "672x672" and choice.native == (112, 1988)
    assert choice.aspect_distortion == pytest.approx(20)  # (672/672) / (100/2000)
    assert choice.lost_tokens == pytest.approx(284 - 28.8)


def test_no_image_buckets() -> None:
    raises(lambda: image(224, 224, []), "no image buckets", "images: [224x224")


# --- videos ---------------------------------------------------------------------------------------------------


def test_video_takes_the_2fps_frame_count() -> None:
    # 120 frames at 30 fps = 4 s -> 8 frames at 2 fps. Frame 240x320 (native 252x308, 99 tokens) against the 8-frame
    # buckets: 224x224 keeps 64 * 3/4 = 48, 112x112 keeps 12; both are below the floor, 224x224 keeps more.
    choice = video(120, 30)
    assert choice.bucket == VideoBucket(8, 224, 224) and choice.wanted_frames == 8 and choice.native == (252, 308)
    assert choice.frame_indices.dtype == np.int64
    assert choice.frame_indices.tolist() == [0, 15, 30, 45, 60, 75, 90, 105]  # i * 120 // 8
    # A 100x100 frame is 112x112 natively (16 tokens): 112x112 holds it exactly.
    assert video(120, 30, 100, 100).bucket == VideoBucket(8, 112, 112)


def test_video_frame_count_closest_to_2fps() -> None:
    assert video(90, 30).bucket.frames == 8  # 3 s -> 6 frames; 4 and 8 are both 2 away: more frames
    assert video(600, 30).bucket.frames == 16  # 20 s -> 40 frames; 16 is the closest
    # 12 frames at 1 fps = 12 s -> 24, capped at the 12 the clip has. 16 would tie with 8 but needs frames
    # the clip does not have; 8 frames: i * 12 // 8.
    short = video(12, 1)
    assert (short.wanted_frames, short.bucket.frames) == (12, 8)
    assert short.frame_indices.tolist() == [0, 1, 3, 4, 6, 7, 9, 10]


def test_video_with_too_few_frames() -> None:
    raises(lambda: video(3, 30), "video has 3 frames", "4x112x112", "needs 4", "frames: 2, size: 112x112")
    raises(lambda: video(1, 30), "video has 1 frame;", "as an image")
    raises(lambda: video(8, 30, buckets=[]), "no video buckets", "videos: [{frames: 8")


# --- text -----------------------------------------------------------------------------------------------------


def test_text_buckets() -> None:
    exact = choose_text_buckets(256, 768, DEFAULT)  # 256 + 768 = 1024: S 256, C 1024, nothing spare
    assert (exact.batch, exact.prefill, exact.cache, exact.padding_tokens, exact.unused_cache) == (1, 256, 1024, 0, 0)
    padded = choose_text_buckets(300, 100, DEFAULT)  # S 512: 212 padding; C 1024: 1024 - 400 = 624 unused
    assert (padded.prefill, padded.cache, padded.padding_tokens, padded.unused_cache) == (512, 1024, 212, 624)
    longer = choose_text_buckets(300, 1000, DEFAULT)  # 1300 > 1024: C 2048, 748 unused
    assert (longer.prefill, longer.cache, longer.unused_cache) == (512, 2048, 748)
    # prefill [128, 512], cache [256, 1024]: a 200-token prompt needs S 512, which only pairs with C 1024.
    spec = BucketSpec.from_dict({"prefill": [128, 512], "cache": [256, 1024], "batch": [1, 4]})
    assert choose_text_buckets(200, 10, spec, batch=2) == choose_text_buckets(200, 10, spec, batch=4)
    assert choose_text_buckets(200, 10, spec, batch=2).batch == 4
    assert (choose_text_buckets(200, 10, spec).prefill, choose_text_buckets(200, 10, spec).cache) == (512, 1024)


def test_a_prompt_longer_than_every_prefill_bucket_is_prefilled_in_chunks() -> None:
    # 1500 + 10 fits the 2048 cache; chunks of the largest prefill bucket (1024), the last (476) in 512.
    long = choose_text_buckets(1500, 10, DEFAULT)
    assert (long.cache, long.calls, long.prefill, long.padding_tokens) == (2048, (1024, 512), 512, 36)
    # A prompt that ends exactly on a chunk boundary: no padding, no extra call.
    boundary = choose_text_buckets(1024 + 512, 10, DEFAULT)
    assert (boundary.calls, boundary.padding_tokens) == ((1024, 512), 0)
    # A reused prefix leaves only the rest to prefill: one call when it fits a bucket.
    assert choose_text_buckets(1500, 10, DEFAULT, reused=1400).calls == (128,)
    # The cache is chosen for prompt + new tokens, the chunks within it (prefill [128], cache [300, 1024]).
    small = BucketSpec.from_dict({"prefill": [128], "cache": [300, 1024], "batch": [1]})
    assert choose_text_buckets(290, 10, small).calls == (128, 128, 128)
    assert choose_text_buckets(290, 10, small).cache == 300


def test_text_errors_say_the_numbers_and_the_fix() -> None:
    raises(lambda: choose_text_buckets(3000, 10, DEFAULT), "prompt is 3000 tokens", "largest cache bucket (2048)",
           "cache: [..., 4096]", "shorten the prompt")
    # 900 + 2000 = 2900 > 2048; at most 2048 - 900 = 1148 new tokens fit.
    raises(lambda: choose_text_buckets(900, 2000, DEFAULT), "900", "2000", "2900", "2048",
           "max_new_tokens to <= 1148", "cache: [..., 4096]")
    raises(lambda: choose_text_buckets(10, 10, DEFAULT, batch=2), "batch of 2", "largest batch bucket is 1",
           "batch: [..., 2]")
