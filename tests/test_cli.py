"""The `mindvl` command: the demo end to end, and bad input as one-line errors with a non-zero exit."""

import json
import shutil
import subprocess
import sys

import pytest
from media import sample_image, write_empty_video
from safetensors.numpy import load_file, save_file

from mindvl.apps.cli import main
from mindvl.errors import MindVLError
from mindvl.testing.checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("tiny")


def test_demo_runs_end_to_end(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mindvl", "demo", "--cache-dir", str(tmp_path),
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("runtime   prefill") == 2 and run.stdout.count("pynative  prefill") == 2
    assert run.stdout.count("(same tokens)") == 2, run.stdout
    assert "exported 13 graphs" in run.stdout and "faster per token than pynative" in run.stdout
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "demo.mp4").is_file()


def copy_model(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "model")


def other_model_type(tiny, tmp_path):
    model = copy_model(tiny, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_5_vl"}))
    return ["--model", str(model)]


def missing_shard(tiny, tmp_path):
    model = write_checkpoint(tmp_path / "sharded", "tiny", shard_max_bytes=200_000)
    shards = sorted(model.glob("model-*.safetensors"))
    shards[-1].unlink()
    return ["--model", str(model)]


def wrong_shape(tiny, tmp_path):
    model = copy_model(tiny, tmp_path)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100]
    save_file(tensors, model / "model.safetensors")
    return ["--model", str(model)]


def no_config(tiny, tmp_path):
    model = copy_model(tiny, tmp_path)
    (model / "config.json").unlink()
    return ["--model", str(model)]


def text_as_image(tiny, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    return ["--model", str(tiny), "--image", str(tmp_path / "notes.png")]


def truncated_png(tiny, tmp_path):
    sample_image(200, 300, seed=0).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    return ["--model", str(tiny), "--image", str(tmp_path / "cut.png")]


def missing_image(tiny, tmp_path):
    return ["--model", str(tiny), "--image", str(tmp_path / "absent.jpg")]


def empty_video(tiny, tmp_path):
    return ["--model", str(tiny), "--video", str(write_empty_video(tmp_path / "blank.avi"))]


def text_as_video(tiny, tmp_path):
    (tmp_path / "clip.mp4").write_text("no frames here")
    return ["--model", str(tiny), "--video", str(tmp_path / "clip.mp4")]


BAD_INPUT = {
    other_model_type: "model_type 'qwen2_5_vl' is not supported",
    missing_shard: r"shard model-\d+-of-\d+\.safetensors .* is missing",
    wrong_shape: r"model.layers.1.mlp.up_proj.weight .* \[100, 64\] .* \[128, 64\]",
    no_config: "config.json is missing",
    text_as_image: "notes.png: not an image",
    truncated_png: "cut.png: .*truncated",
    missing_image: "absent.jpg: image file not found",
    empty_video: "blank.avi: .*no decodable frames",
    text_as_video: "clip.mp4: .*not a video",
}


@pytest.mark.parametrize("make, message", BAD_INPUT.items(), ids=[f.__name__ for f in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, make, message):
    assert main(["demo", *make(tiny, tmp_path), "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mindvl: error: "), err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_debug_shows_the_traceback(tiny, tmp_path):
    with pytest.raises(MindVLError):
        main(["--debug", "demo", *text_as_image(tiny, tmp_path), "--cache-dir", str(tmp_path / "cache")])
