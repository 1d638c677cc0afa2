"""Bad input to `mindvl export`, `mindvl generate` and `mindvl inspect --verify`: each ends with exit code 2 and
ONE line `mindvl: error: …` that names the problem and the fix, no traceback, nothing on stdout, and nothing
written or changed on disk (no new folder, no leftover temporary folder, the artifact folder untouched).

The tiny model is exported once per session; cases that damage an artifact folder damage a copy.
"""

import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import PIL.ImageFile
import pytest
from media import sample_image, write_sample_video

from mindvl.cli import main
from mindvl.shapes.manifest import file_sha256


@pytest.fixture(scope="module")
def built(exported):
    """(tiny model folder, its artifacts at the `tiny` preset)."""
    return exported("tiny")


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` with its size, mtime and (files) sha256: equal snapshots = nothing changed."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns,
                                         None if p.is_dir() else file_sha256(p))
            for p in sorted(folder.rglob("*"))}


def assert_one_line_error(code: int, out: str, err: str, *patterns: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("mindvl: error: "), err
    assert "Traceback" not in err and out == "", (out, err)
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in {err!r}"


# --- media files ------------------------------------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature, an IHDR claiming width x height (correct CRC), then IEND: tiny on disk, no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def generate(art: Path, *extra: str) -> list[str]:
    return ["generate", str(art), "-p", "Describe it.", "--max-new-tokens", "4", *extra]


def corrupt_image(model, art, tmp):
    (tmp / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return generate(art, "--image", str(tmp / "noise.png"))


def empty_image(model, art, tmp):
    (tmp / "empty.png").write_bytes(b"")
    return generate(art, "--image", str(tmp / "empty.png"))


def truncated_png(model, art, tmp):
    sample_image(200, 300, seed=0).save(tmp / "cut.png")
    data = (tmp / "cut.png").read_bytes()
    (tmp / "cut.png").write_bytes(data[: len(data) // 2])
    return generate(art, "--image", str(tmp / "cut.png"))


def bomb_image(model, art, tmp):  # above PIL's own limit: PIL's header check fires first
    return generate(art, "--image", str(png_header_only(tmp / "bomb.png", 30000, 30000)))


def big_image(model, art, tmp):  # below PIL's limit, above mindvl's
    return generate(art, "--image", str(png_header_only(tmp / "big.png", 8500, 8500)))


def text_as_video(model, art, tmp):
    (tmp / "notes.mp4").write_text("no frames here")
    return generate(art, "--video", str(tmp / "notes.mp4"))


def two_frame_video(model, art, tmp):  # the tiny preset's only video bucket takes 4 frames
    return generate(art, "--video", str(write_sample_video(tmp / "two.mp4", frames=2, size=(112, 112))))


# --- token counts and sampling ----------------------------------------------------------------------------------

def prompt_too_long(model, art, tmp):
    return ["generate", str(art), "-p", "word " * 300, "--max-new-tokens", "4"]


def beyond_largest_cache(model, art, tmp):
    return ["generate", str(art), "-p", "Hi.", "--max-new-tokens", "1000"]


def no_new_tokens(model, art, tmp):
    return ["generate", str(art), "-p", "Hi.", "--max-new-tokens", "0"]


def negative_temperature(model, art, tmp):
    return generate(art, "--temperature", "-1")


def nan_temperature(model, art, tmp):
    return generate(art, "--temperature", "nan")


def zero_top_p(model, art, tmp):
    return generate(art, "--temperature", "0.7", "--top-p", "0")


def negative_top_k(model, art, tmp):
    return generate(art, "--temperature", "0.7", "--top-k", "-1")


# --- artifact folders -------------------------------------------------------------------------------------------

def copy_artifacts(art, tmp):
    return Path(shutil.copytree(art, tmp / "art"))


def edit_manifest(art, tmp, **changes):
    copy = copy_artifacts(art, tmp)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, **changes}, indent=1))
    return copy


def missing_graph(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    (copy / "graphs" / "prefill_b1_s64_c256.mindir").unlink()
    return generate(copy)


def missing_decode_graph(model, art, tmp):  # refused at load, not after the first token was streamed
    copy = copy_artifacts(art, tmp)
    (copy / "graphs" / "decode_b1_c256.mindir").unlink()
    return generate(copy, "--stream")


def missing_graph_verify(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    (copy / "graphs" / "video_4x112x112.mindir").unlink()
    return ["inspect", str(copy), "--verify"]


def flip_a_byte(path: Path) -> None:
    path.chmod(0o644)  # MindSpore writes graphs read-only
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def tampered_graph(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    flip_a_byte(copy / "graphs" / "prefill_b1_s64_c256.mindir")
    return generate(copy)


def tampered_graph_verify(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    flip_a_byte(copy / "graphs" / "vision_224x224.mindir")
    return ["inspect", str(copy), "--verify"]


def truncated_weights(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    data = (copy / "weights.safetensors").read_bytes()
    (copy / "weights.safetensors").write_bytes(data[: len(data) - 1000])
    return generate(copy)


def tampered_weights(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[-100] ^= 0xFF  # same size: only the hash, taken while the weights are read, can tell
    (copy / "weights.safetensors").write_bytes(bytes(data))
    return generate(copy)


def other_format_version(model, art, tmp):
    return generate(edit_manifest(art, tmp, format_version=99))


def other_format_version_verify(model, art, tmp):
    return ["inspect", str(edit_manifest(art, tmp, format_version=99)), "--verify"]


def corrupt_manifest(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    (copy / "manifest.json").write_text('{"format": "mindvl-artifacts", "graphs": [')
    return generate(copy)


def other_mindspore_major(model, art, tmp):
    return generate(edit_manifest(art, tmp, mindspore_version="1.10.1"))


def folder_does_not_exist(model, art, tmp):
    return generate(tmp / "nowhere")


def model_folder_as_artifacts(model, art, tmp):
    return generate(model)


# --- export -----------------------------------------------------------------------------------------------------

def export_into_non_empty_folder(model, art, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return ["export", str(model), "-o", str(tmp / "out"), "--preset", "tiny"]


def export_onto_a_file(model, art, tmp):
    (tmp / "out.txt").write_text("mine")
    return ["export", str(model), "-o", str(tmp / "out.txt"), "--preset", "tiny"]


def export_unknown_preset(model, art, tmp):
    return ["export", str(model), "-o", str(tmp / "out"), "--preset", "huge"]


def export_without_preprocessor_config(model, art, tmp):
    copy = Path(shutil.copytree(model, tmp / "model"))
    (copy / "preprocessor_config.json").unlink()
    return ["export", str(copy), "-o", str(tmp / "out"), "--preset", "tiny"]


# case -> patterns the one-line error must contain: the problem, then the fix
BAD_INPUT = {
    corrupt_image: [r"noise\.png: not an image", "convert it to PNG or JPEG"],
    empty_image: [r"empty\.png: image file is empty \(0 bytes\)", "re-download"],
    truncated_png: [r"cut\.png: image is corrupt or truncated", "re-download"],
    bomb_image: [r"bomb\.png: image is too large", "900000000 pixels", "downscale it"],
    big_image: [r"big\.png: image is 8500x8500 = 72250000 pixels, more than the \d+ allowed", "downscale it"],
    text_as_video: [r"notes\.mp4: not a video", "convert it to MP4"],
    two_frame_video: [r"two\.mp4: video has 2 frames; the smallest video bucket \(4x112x112\) needs 4",
                      r"add a bucket with at most 2 frames \(videos: \[\.\.\., \{frames: 2, .*\) and re-export"],
    prompt_too_long: [r"prompt is \d+ tokens; the largest prefill bucket is 256",
                      r"add a longer one \(prefill: \[\.\.\., \d+\]\) to the bucket spec and re-export"],
    beyond_largest_cache: [r"max_new_tokens \(1000\) = \d+ tokens, more than the largest cache bucket 512",
                           r"lower max_new_tokens to <= \d+", r"add a cache bucket \(cache: \[\.\.\., \d+\]\)"],
    no_new_tokens: ["max_new_tokens is 0", "at least 1"],
    negative_temperature: ["temperature=-1.0", "invalid", "temperature >= 0"],
    nan_temperature: ["temperature=nan", "invalid", "temperature >= 0"],
    zero_top_p: ["top_p=0.0", "invalid", "0 < top_p <= 1"],
    negative_top_k: ["top_k=-1", "invalid", "top_k >= 0"],
    missing_graph: [r"graphs/prefill_b1_s64_c256\.mindir is missing", "incomplete", "re-export"],
    missing_decode_graph: [r"graphs/decode_b1_c256\.mindir is missing", "incomplete", "re-export"],
    missing_graph_verify: [r"graphs/video_4x112x112\.mindir is missing", "incomplete", "re-export"],
    tampered_graph: [r"graphs/prefill_b1_s64_c256\.mindir .* does not match its sha256", "re-export"],
    tampered_graph_verify: [r"graphs/vision_224x224\.mindir .* does not match its sha256", "re-export"],
    truncated_weights: [r"weights\.safetensors .* does not match", "re-export"],
    tampered_weights: [r"weights\.safetensors does not match its recorded sha256", "re-export"],
    other_format_version: ["version 99; this mindvl reads 'mindvl-artifacts' version 1", "re-export with this mindvl"],
    other_format_version_verify: ["version 99; this mindvl reads", "re-export with this mindvl"],
    corrupt_manifest: [r"manifest\.json is corrupt", "re-export"],
    other_mindspore_major: [r"exported with MindSpore 1\.10\.1; this is MindSpore 2\.",
                            "re-export with this MindSpore"],
    folder_does_not_exist: ["nowhere does not exist", "check the path", "mindvl export MODEL_DIR -o"],
    model_folder_as_artifacts: ["has no manifest.json", "not a mindvl artifact folder", "mindvl export MODEL_DIR -o"],
    export_into_non_empty_folder: ["out is not empty", "pass --force", "choose another -o folder"],
    export_onto_a_file: [r"out\.txt is a file", "choose another -o folder"],
    export_unknown_preset: ["unknown bucket preset 'huge'", "known presets: .*tiny"],
    export_without_preprocessor_config: [r"preprocessor_config\.json is missing", "copy it from the original"],
}


@pytest.mark.parametrize("make, patterns", BAD_INPUT.items(), ids=[f.__name__ for f in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(built, tmp_path, capsys, make, patterns):
    model, art = built
    argv = make(model, art, tmp_path)
    before, art_before, model_before = snapshot(tmp_path), snapshot(art), snapshot(model)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, *patterns)
    assert snapshot(tmp_path) == before, "something was written or changed next to the inputs"
    assert snapshot(art) == art_before and snapshot(model) == model_before


def test_bomb_is_refused_from_its_header_without_decoding(built, tmp_path, capsys, monkeypatch):
    model, art = built
    decoded = []
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    for side in (30000, 8500):
        code = main(generate(art, "--image", str(png_header_only(tmp_path / f"{side}.png", side, side))))
        out, err = capsys.readouterr()
        assert_one_line_error(code, out, err, "too large|more than the", "downscale it")
    assert decoded == [], "pixels were decoded before the size was checked"


def test_killed_export_leaves_no_folder_that_looks_complete(built, tmp_path, capsys):
    """SIGKILL an export midway: the target never appears, `generate` says why in one line, and the next export
    into the same folder removes what the killed one left."""
    model, _ = built
    out = tmp_path / "out"
    export = subprocess.Popen([sys.executable, "-m", "mindvl.cli", "export", str(model), "-o", str(out),
                               "--preset", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob(".out.partial-*/graphs/*.mindir"))) < 3:
            assert export.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline, "the export wrote no graphs in 120 s"
            time.sleep(0.05)
        export.send_signal(signal.SIGKILL)
    finally:
        export.kill()
        export.wait(timeout=60)
    assert export.returncode == -signal.SIGKILL
    assert not out.exists() or not (out / "manifest.json").exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert len(leftovers) == 1

    assert_one_line_error(main(generate(out)), *capsys.readouterr(), "out does not exist, so it has no manifest.json",
                          "an export into it did not finish", r"delete its leftover .*\.out\.partial-",
                          "mindvl export MODEL_DIR -o")
    assert list(tmp_path.iterdir()) == leftovers  # generate wrote nothing

    assert main(["export", str(model), "-o", str(out), "--preset", "tiny"]) == 0
    assert (out / "manifest.json").is_file() and not leftovers[0].exists()
