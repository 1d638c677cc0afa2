"""Video decoding, frame sampling, and preprocessing identical to transformers 4.57.1's video path."""

from __future__ import annotations

from dataclasses import asdict

import av
import media
import numpy as np
import pytest
from transformers import Qwen2VLImageProcessor

from mindvl.errors import MediaError
from mindvl.shapes.image import ProcessorConfig
from mindvl.shapes.video import load_video, preprocess_video, sample_frame_indices

CFG = ProcessorConfig()


def reference(frames: np.ndarray, cfg: ProcessorConfig = CFG):
    # Qwen2VLVideoProcessor needs torchvision; without it this is the video path transformers runs.
    out = Qwen2VLImageProcessor(**asdict(cfg))(images=None, videos=[frames])
    return out["pixel_values_videos"], out["video_grid_thw"]


def decode_all(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    # 12 frames at 4 fps = 3 s; at 2 fps that samples 6 frames.
    return media.write_sample_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames=12, size=(90, 124), fps=4)


def test_load_video_samples_uniformly(video_path) -> None:
    frames = load_video(video_path, fps=2.0)
    assert frames.dtype == np.uint8 and frames.shape == (6, 90, 124, 3)
    assert np.array_equal(frames, decode_all(video_path)[[0, 2, 4, 6, 8, 10]])


def test_decoded_video_matches_transformers(video_path) -> None:
    frames = load_video(video_path, fps=2.0)
    ours, grid = preprocess_video(frames, CFG)
    theirs, their_grid = reference(frames)
    assert ours.dtype == np.float32 and grid.dtype == np.int64 and grid.shape == (1, 3)
    assert np.array_equal(grid, their_grid) and np.array_equal(ours, theirs)


@pytest.mark.parametrize("count, height, width", [(5, 60, 80), (2, 33, 47), (4, 300, 200)])
def test_frames_match_transformers(count: int, height: int, width: int) -> None:
    # An odd count exercises the padding with the last frame.
    frames = media.video_frames(count, height, width, seed=count)
    cfg = ProcessorConfig(max_pixels=28 * 28 * 40)
    ours, grid = preprocess_video(frames, cfg)
    theirs, their_grid = reference(frames, cfg)
    assert np.array_equal(grid, their_grid) and np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    "total, native_fps, fps, min_frames, max_frames",
    [(12, 4, 2.0, 4, 768), (1, 30, 2.0, 4, 768), (3, 30, 2.0, 4, 768), (301, 29.97, 2.0, 4, 768),
     (10_000, 30, 2.0, 4, 768), (100, 25, 1.0, 4, 11), (7, 1, 0.5, 1, 768)],
)
def test_sampled_frame_count_is_even_and_in_range(total, native_fps, fps, min_frames, max_frames) -> None:
    indices = sample_frame_indices(total, native_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    assert len(indices) >= 2 and len(indices) % 2 == 0 and len(indices) <= max(max_frames, 2)
    assert indices[0] == 0 and np.all(np.diff(indices) >= 0) and indices[-1] < total


def test_one_frame_video_gives_two_frames(tmp_path) -> None:
    path = media.write_sample_video(tmp_path / "still.mp4", frames=1, size=(64, 64), fps=4)
    frames = load_video(path)
    assert frames.shape == (2, 64, 64, 3) and np.array_equal(frames[0], frames[1])


def assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_missing_video(tmp_path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(MediaError, match="not found") as err:
        load_video(path)
    assert_one_line_naming(err, path)


def test_empty_video_file(tmp_path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(MediaError, match="empty") as err:
        load_video(path)
    assert_one_line_naming(err, path)


def test_text_file_named_mp4(tmp_path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n")
    with pytest.raises(MediaError, match="not a video") as err:
        load_video(path)
    assert_one_line_naming(err, path)


def test_video_without_frames(tmp_path) -> None:
    path = media.write_empty_video(tmp_path / "blank.avi")
    with pytest.raises(MediaError, match="no decodable frames") as err:
        load_video(path)
    assert_one_line_naming(err, path)
