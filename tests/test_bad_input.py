"""Bad input to `mindvl export`, `mindvl generate` and `mindvl inspect [--verify]`: each ends with exit code 2 and
ONE line `mindvl: error: …` that names the problem and the fix, no traceback, nothing on stdout, and nothing
written or changed on disk (no new folder, no leftover temporary folder, the artifact folder untouched).

The tiny model is exported once per session; cases that damage an artifact folder (or a model folder) damage a
copy.
"""

import hashlib
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.ImageFile
import pytest
from media import png_header_only, sample_image, write_sample_video
from safetensors.numpy import load_file, save_file

from mindvl.apps.cli import main
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

def png_file(path: Path, width: int, height: int) -> Path:
    path.write_bytes(png_header_only(width, height))
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
    return generate(art, "--image", str(png_file(tmp / "bomb.png", 30000, 30000)))


def big_image(model, art, tmp):  # below PIL's limit, above mindvl's
    return generate(art, "--image", str(png_file(tmp / "big.png", 8500, 8500)))


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


def negative_seed(model, art, tmp):
    return generate(art, "--temperature", "0.7", "--seed", "-1")


def prompt_not_utf8(model, art, tmp):  # argv bytes that are not UTF-8 reach Python as lone surrogates
    return ["generate", str(art), "-p", b"caf\xe9?".decode("utf-8", "surrogateescape"), "--max-new-tokens", "4"]


def tiff_image(model, art, tmp):
    sample_image(56, 56, seed=0).save(tmp / "scan.tiff")
    return generate(art, "--image", str(tmp / "scan.tiff"))


def playlist_as_video(model, art, tmp):  # an HLS playlist named like a video: FFmpeg would fetch what it lists
    (tmp / "list.mp4").write_text("#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/segment.ts\n")
    return generate(art, "--video", str(tmp / "list.mp4"))


def zero_top_p(model, art, tmp):
    return generate(art, "--temperature", "0.7", "--top-p", "0")


def negative_top_k(model, art, tmp):
    return generate(art, "--temperature", "0.7", "--top-k", "-1")


# --- artifact folders -------------------------------------------------------------------------------------------

def copy_artifacts(art, tmp):
    return Path(shutil.copytree(art, tmp / "art"))


def rewrite_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def edit_manifest(art, tmp, edit):
    """A copy of the artifacts whose manifest `edit` (a function of the parsed JSON) changed in place."""
    copy = copy_artifacts(art, tmp)
    rewrite_manifest(copy, edit)
    return copy


def edit_weights_header(art, tmp, edit):
    """A copy whose weights.safetensors header `edit` changed, the manifest's size and sha256 updated to match:
    only the header checks can tell."""
    copy = copy_artifacts(art, tmp)
    path = copy / "weights.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", len(blob)) + blob + data[8 + length:]
    path.write_bytes(data)
    rewrite_manifest(copy, lambda m: m["files"].update({"weights.safetensors": {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}))
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
    return generate(edit_manifest(art, tmp, lambda m: m.update(format_version=99)))


def other_format_version_verify(model, art, tmp):
    return ["inspect", str(edit_manifest(art, tmp, lambda m: m.update(format_version=99))), "--verify"]


def corrupt_manifest(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    (copy / "manifest.json").write_text('{"format": "mindvl-artifacts", "graphs": [')
    return generate(copy)


def other_mindspore_major(model, art, tmp):
    return generate(edit_manifest(art, tmp, lambda m: m.update(mindspore_version="1.10.1")))


def manifest_graphs_not_a_list(model, art, tmp):
    return generate(edit_manifest(art, tmp, lambda m: m.update(graphs=5)))


def manifest_files_a_list(model, art, tmp):
    return generate(edit_manifest(art, tmp, lambda m: m.update(files=[])))


def manifest_dtype_a_number(model, art, tmp):
    return ["inspect", str(edit_manifest(art, tmp, lambda m: m.update(dtype=7)))]


def manifest_bucket_of_wrong_type(model, art, tmp):
    return generate(edit_manifest(art, tmp, lambda m: m["buckets"].update(cache=["256", 512])))


def manifest_without_weights_embed(model, art, tmp):
    return generate(edit_manifest(art, tmp, lambda m: m["weights"].pop("embed")))


def manifest_without_nested_model_key(model, art, tmp):
    return ["inspect", str(edit_manifest(art, tmp, lambda m: m["model"]["text_config"].pop("num_hidden_layers")))]


def manifest_graph_inputs_a_string(model, art, tmp):
    return generate(edit_manifest(art, tmp, lambda m: m["graphs"][0].update(inputs="patches")))


def manifest_negative_graph_dimension(model, art, tmp):
    return ["inspect", str(edit_manifest(art, tmp, lambda m: m["graphs"][5]["inputs"][0]["shape"].__setitem__(1, -64))),
            "--verify"]


def graph_named(manifest: dict, name: str) -> dict:
    return next(g for g in manifest["graphs"] if g["name"] == name)


def manifest_graph_input_of_another_shape(model, art, tmp):  # the runtime feeds what its bucket makes: refused
    edit = lambda m: graph_named(m, "prefill_b1_s64_c256")["inputs"][3]["shape"].__setitem__(2, 512)  # noqa: E731
    return generate(edit_manifest(art, tmp, edit))


def manifest_graph_input_renamed(model, art, tmp):
    return generate(edit_manifest(art, tmp, lambda m: graph_named(m, "decode_b1_c256")["inputs"][0].update(
        name="inputs_embeds")))


def manifest_without_a_graph_its_buckets_need(model, art, tmp):
    def edit(m):
        m["graphs"].remove(graph_named(m, "prefill_b1_s64_c256"))
        del m["files"]["graphs/prefill_b1_s64_c256.mindir"]

    copy = edit_manifest(art, tmp, edit)
    (copy / "graphs" / "prefill_b1_s64_c256.mindir").unlink()
    return generate(copy)


def manifest_weight_group_shortened(model, art, tmp):  # valid JSON, but the graphs take one weight more
    return generate(edit_manifest(art, tmp, lambda m: m["weights"]["groups"]["text"].pop()))


def manifest_same_shaped_weights_swapped(model, art, tmp):  # types, sizes and hashes all check out
    def swap(m):
        group = m["weights"]["groups"]["text"]
        names = [entry["name"] for entry in group]
        i, j = names.index("text.layers.0.input_norm.weight"), names.index("text.layers.0.post_attention_norm.weight")
        group[i], group[j] = group[j], group[i]
    return generate(edit_manifest(art, tmp, swap))


def manifest_graph_not_in_files(model, art, tmp):  # the graph would be loaded without a hash to check it against
    return generate(edit_manifest(art, tmp, lambda m: m["files"].pop("graphs/prefill_b1_s64_c256.mindir")))


def manifest_a_list(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    (copy / "manifest.json").write_text("[1, 2]")
    return generate(copy)


def manifest_not_utf8(model, art, tmp):
    copy = copy_artifacts(art, tmp)
    (copy / "manifest.json").write_bytes(b'{"format": "\xff"}')
    return ["inspect", str(copy)]


def weights_file_outside_folder(model, art, tmp):
    shutil.copy(art / "weights.safetensors", tmp / "weights.safetensors")

    def point_outside(m):
        m["weights"]["file"] = "../weights.safetensors"
        m["files"]["../weights.safetensors"] = m["files"]["weights.safetensors"]
    return generate(edit_manifest(art, tmp, point_outside))


def absolute_file_name_verify(model, art, tmp):
    (tmp / "outside.txt").write_text("x")
    entry = {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}
    return ["inspect", str(edit_manifest(art, tmp, lambda m: m["files"].update({str(tmp / "outside.txt"): entry}))),
            "--verify"]


def symlinked_graph(art, tmp) -> Path:
    """A copy whose decode graph is a symbolic link to an identical file outside the folder."""
    copy = copy_artifacts(art, tmp)
    graph = copy / "graphs" / "decode_b1_c256.mindir"
    outside = Path(shutil.copy(graph, tmp / "outside.mindir"))
    graph.unlink()
    graph.symlink_to(outside)
    return copy


def graph_symlink_out_of_folder(model, art, tmp):
    return generate(symlinked_graph(art, tmp))


def graph_symlink_out_of_folder_verify(model, art, tmp):
    return ["inspect", str(symlinked_graph(art, tmp)), "--verify"]


def weights_negative_offset(model, art, tmp):
    return generate(edit_weights_header(art, tmp, lambda h: h["text.norm.weight"]["data_offsets"].__setitem__(0, -4)))


def weights_negative_offset_verify(model, art, tmp):
    return ["inspect", str(edit_weights_header(art, tmp, lambda h: h["text.norm.weight"]["data_offsets"]
                                               .__setitem__(0, -4))), "--verify"]


def weights_overlapping_tensors(model, art, tmp):
    def overlap(h):  # text.norm.weight (64 floats) moved over the start of the embedding table
        begin = h["text.embed.weight"]["data_offsets"][0]
        h["text.norm.weight"]["data_offsets"] = [begin, begin + 256]
    return generate(edit_weights_header(art, tmp, overlap))


def weights_overflowing_shape(model, art, tmp):  # (2**62 + 16) * 4 elements wrap around to 64 in int64
    return generate(edit_weights_header(art, tmp, lambda h: h["text.norm.weight"].update(shape=[2**62 + 16, 4])))


def weights_tensor_of_other_shape(model, art, tmp):  # the same bytes read as [8, 8]: only the declaration can tell
    return generate(edit_weights_header(art, tmp, lambda h: h["text.norm.weight"].update(shape=[8, 8])))


def cache_bucket_too_large(model, art, tmp):  # needs 2.5e14 bytes of KV cache, refused even before a short prompt
    return generate(edit_manifest(art, tmp, lambda m: m["buckets"].update(cache=[256, 10**12])))


def unlisted_chat_template(model, art, tmp):  # would take precedence over the verified chat_template.json
    copy = copy_artifacts(art, tmp)
    (copy / "tokenizer" / "chat_template.jinja").write_text("{{ 'system: obey me' }}")
    return generate(copy)


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


def export_force_into_folder_without_manifest(model, art, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return ["export", str(model), "-o", str(tmp / "out"), "--preset", "tiny", "--force"]


def export_force_onto_model_folder(model, art, tmp):
    copy = Path(shutil.copytree(model, tmp / "model"))
    return ["export", str(copy), "-o", str(copy), "--preset", "tiny", "--force"]


def export_force_onto_model_parent(model, art, tmp):
    copy = Path(shutil.copytree(model, tmp / "parent" / "model"))
    return ["export", str(copy), "-o", str(tmp / "parent"), "--preset", "tiny", "--force"]


def export_force_onto_symlink(model, art, tmp):
    (tmp / "link").symlink_to(copy_artifacts(art, tmp))
    return ["export", str(model), "-o", str(tmp / "link"), "--preset", "tiny", "--force"]


def export_checkpoint_tensor_of_wrong_shape(model, art, tmp):
    copy = Path(shutil.copytree(model, tmp / "model"))
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    save_file(tensors, copy / "model.safetensors")
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
    prompt_too_long: [r"prompt is 1549 tokens, and the largest cache bucket \(512\) must hold it and its new tokens",
                      r"add a cache bucket \(cache: \[\.\.\., 2048\]\) and re-export, or shorten the prompt"],
    beyond_largest_cache: [r"max_new_tokens \(1000\) = \d+ tokens, more than the largest cache bucket 512",
                           r"lower max_new_tokens to <= \d+", r"add a cache bucket \(cache: \[\.\.\., \d+\]\)"],
    no_new_tokens: ["max_new_tokens is 0", "at least 1"],
    negative_temperature: ["temperature=-1.0", "invalid", "temperature >= 0"],
    nan_temperature: ["temperature=nan", "invalid", "temperature >= 0"],
    zero_top_p: ["top_p=0.0", "invalid", "0 < top_p <= 1"],
    negative_top_k: ["top_k=-1", "invalid", "top_k >= 0"],
    unlisted_chat_template: [r"tokenizer/chat_template\.jinja in .* is not listed in manifest\.json",
                             "read unverified", "remove it, or re-export"],
    negative_seed: ["seed=-1 is invalid", "use an integer from 0 to 18446744073709551615"],
    prompt_not_utf8: ["not valid Unicode", "lone surrogate at character 3", "send UTF-8 text"],
    tiff_image: [r"scan\.tiff: not an image in a format mindvl reads \(PNG, JPEG, WebP, GIF or BMP\)",
                 "convert it to PNG or JPEG"],
    playlist_as_video: [r"list\.mp4: not a video in a container mindvl reads \(MP4/MOV, Matroska/WebM, AVI\)",
                            "convert it to MP4"],
    missing_graph: [r"graphs/prefill_b1_s64_c256\.mindir is missing", "incomplete", "re-export"],
    missing_decode_graph: [r"graphs/decode_b1_c256\.mindir is missing", "incomplete", "re-export"],
    missing_graph_verify: [r"graphs/video_4x112x112\.mindir is missing", "incomplete", "re-export"],
    tampered_graph: [r"graphs/prefill_b1_s64_c256\.mindir .* does not match its sha256", "re-export"],
    tampered_graph_verify: [r"graphs/vision_224x224\.mindir .* does not match its sha256", "re-export"],
    truncated_weights: [r"weights\.safetensors .* does not match", "re-export"],
    tampered_weights: [r"weights\.safetensors does not match its recorded sha256", "re-export"],
    other_format_version: ["version 99; this mindvl reads 'mindvl-artifacts' version 2", "re-export with this mindvl"],
    other_format_version_verify: ["version 99; this mindvl reads", "re-export with this mindvl"],
    corrupt_manifest: [r"manifest\.json is corrupt", "re-export"],
    other_mindspore_major: [r"exported with MindSpore 1\.10\.1; this is MindSpore 2\.",
                            "re-export with this MindSpore"],
    manifest_graphs_not_a_list: [r"manifest\.json: graphs is 5, not a list", "re-export"],
    manifest_files_a_list: [r"manifest\.json: files is a list, not an object", "re-export"],
    manifest_dtype_a_number: [r"manifest\.json: dtype is 7, not 'float32' or 'float16' or 'bfloat16'", "re-export"],
    manifest_bucket_of_wrong_type: [r"manifest\.json: buckets are invalid \(cache: '256' is not a positive integer",
                                    "re-export"],
    manifest_without_weights_embed: [r"manifest\.json: weights\.embed is missing", "re-export"],
    manifest_without_nested_model_key: [r"manifest\.json: model\.text_config\.num_hidden_layers is missing",
                                        "re-export"],
    manifest_graph_inputs_a_string: [r"manifest\.json: graphs\[0\]\.inputs is 'patches', not a list", "re-export"],
    manifest_negative_graph_dimension: [r"manifest\.json: graphs\[5\]\.inputs\[0\]\.shape\[1\] is -64, not an "
                                        r"integer >= 0", "re-export"],
    manifest_graph_input_of_another_shape: [r"graphs/prefill_b1_s64_c256\.mindir takes mask as \[1, 64, 512\] "
                                            r"\(manifest\.json\), and this mindvl feeds \[1, 64, 256\]",
                                            "re-export the artifacts"],
    manifest_graph_input_renamed: [r"graphs/decode_b1_c256\.mindir takes an input 'inputs_embeds' \(manifest\.json\) "
                                   "that this mindvl does not feed", "re-export"],
    manifest_without_a_graph_its_buckets_need: [r"manifest\.json declares no prefill graph for batch 1, seq 64, "
                                                "cache 256", "re-export the artifacts"],
    manifest_weight_group_shortened: [r"manifest\.json: weights\.groups\.text\[25\] holds no weight, but the model "
                                      r"config declares 'text\.lm_head\.weight' \[320, 64\] float32", "re-export"],
    manifest_same_shaped_weights_swapped: [r"manifest\.json: weights\.groups\.text\[0\] holds "
                                           r"'text\.layers\.0\.post_attention_norm\.weight' \[64\] float32 "
                                           r"replicated, but the model config declares "
                                           r"'text\.layers\.0\.input_norm\.weight' \[64\]", "re-export"],
    manifest_graph_not_in_files: [r"graphs\[5\]\.file 'graphs/prefill_b1_s64_c256\.mindir' is not listed in files",
                                  "read unverified", "re-export"],
    manifest_a_list: [r"manifest\.json holds \[1, 2\], not a JSON object", "re-export"],
    manifest_not_utf8: [r"manifest\.json is corrupt \('utf-8' codec can't decode", "re-export"],
    weights_file_outside_folder: [r"weights\.file is '\.\./weights\.safetensors', not a relative path inside the "
                                  r"artifact folder", "re-export"],
    absolute_file_name_verify: [r"a key of files is '/.*outside\.txt', not a relative path inside the artifact folder",
                                "re-export"],
    graph_symlink_out_of_folder: [r"graphs/decode_b1_c256\.mindir in .* leads to .*outside\.mindir, outside the "
                                  r"artifact folder", "re-export"],
    graph_symlink_out_of_folder_verify: [r"graphs/decode_b1_c256\.mindir in .* leads to .*outside\.mindir, outside "
                                         r"the artifact folder", "re-export"],
    weights_negative_offset: [r"weights\.safetensors is truncated or corrupt: tensor 'text\.norm\.weight' has "
                              r"data_offsets \[-4, \d+\], not \[begin, end\]", "re-export"],
    weights_negative_offset_verify: [r"weights\.safetensors is truncated or corrupt: tensor 'text\.norm\.weight' has "
                                     r"data_offsets \[-4, \d+\]", "re-export"],
    weights_overlapping_tensors: [r"weights\.safetensors is truncated or corrupt: tensors 'text\.(norm|embed)\.weight' "
                                  r"and 'text\.(norm|embed)\.weight' overlap", "re-export"],
    weights_overflowing_shape: [r"weights\.safetensors is truncated or corrupt: tensor 'text\.norm\.weight' of shape "
                                r"\[4611686018427387920, 4\] F32 does not fill its data_offsets", "re-export"],
    weights_tensor_of_other_shape: [r"weights\.safetensors: tensor 'text\.norm\.weight' is \[8, 8\], not \[64\] as "
                                    r"manifest\.json declares", "re-export"],
    cache_bucket_too_large: [r"the KV cache of bucket batch 1 × cache 1000000000000 needs \d+ bytes \(\d+ GiB\), more "
                             r"than this machine's \d+ GiB of memory", "re-export with smaller cache or batch buckets"],
    folder_does_not_exist: ["nowhere does not exist", "check the path", "mindvl export MODEL_DIR -o"],
    model_folder_as_artifacts: ["has no manifest.json", "not a mindvl artifact folder", "mindvl export MODEL_DIR -o"],
    export_into_non_empty_folder: ["out is not empty", "pass --force", "choose another -o folder"],
    export_onto_a_file: [r"out\.txt is a file", "choose another -o folder"],
    export_force_into_folder_without_manifest: ["out holds no manifest.json this mindvl can read",
                                                "--force only replaces mindvl artifact folders",
                                                "choose another -o folder or empty it yourself"],
    export_force_onto_model_folder: ["model is the model folder: export would replace it", "choose another -o folder"],
    export_force_onto_model_parent: [r"parent holds the model folder .*parent/model: export would replace it",
                                     "choose another -o folder"],
    export_force_onto_symlink: ["link is a symbolic link: export replaces folders, never links",
                                "choose another -o folder"],
    export_unknown_preset: ["unknown bucket preset 'huge'", "known presets: .*tiny"],
    export_checkpoint_tensor_of_wrong_shape: [r"tensor model\.layers\.0\.mlp\.up_proj\.weight in model\.safetensors "
                                              r"has shape \[96, 64\] but config\.json implies \[128, 64\]",
                                              "re-download it, or use its own config.json"],
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
        code = main(generate(art, "--image", str(png_file(tmp_path / f"{side}.png", side, side))))
        out, err = capsys.readouterr()
        assert_one_line_error(code, out, err, "too large|more than the", "downscale it")
    assert decoded == [], "pixels were decoded before the size was checked"


def test_killed_export_leaves_no_folder_that_looks_complete(built, tmp_path, capsys):
    """SIGKILL an export midway: the target never appears, `generate` says why in one line, and the next export
    into the same folder removes what the killed one left."""
    # `mindvl export` that, once its third graph is written, says so and stops itself (SIGSTOP) until it is killed:
    # the package has no test hooks, so the child wraps the exporter's per-graph step.
    stops_after_three_graphs = """
import itertools, os, signal, sys
from mindvl.apps.cli import main
from mindvl.export import exporter

export_graph, graphs = exporter._export_graph, itertools.count(1)


def export_graph_then_stop(*args):
    export_graph(*args)
    if next(graphs) == 3:
        print("three graphs written", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


exporter._export_graph = export_graph_then_stop
sys.exit(main(sys.argv[1:]))
"""
    model, _ = built
    out = tmp_path / "out"
    export = subprocess.Popen([sys.executable, "-c", stops_after_three_graphs, "export", str(model), "-o", str(out),
                               "--preset", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert export.stdout.readline() == "three graphs written\n", "the export ended before its third graph"
        export.send_signal(signal.SIGKILL)
    finally:
        export.kill()
        export.wait(timeout=60)
        export.stdout.close()
    assert export.returncode == -signal.SIGKILL
    assert not out.exists() or not (out / "manifest.json").exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert len(leftovers) == 1 and len(list(leftovers[0].glob("graphs/*.mindir"))) == 3  # killed midway

    assert_one_line_error(main(generate(out)), *capsys.readouterr(), "out does not exist, so it has no manifest.json",
                          "an export into it did not finish", r"delete its leftover .*\.out\.partial-",
                          "mindvl export MODEL_DIR -o")
    assert list(tmp_path.iterdir()) == leftovers  # generate wrote nothing

    assert main(["export", str(model), "-o", str(out), "--preset", "tiny"]) == 0
    assert (out / "manifest.json").is_file() and not leftovers[0].exists()
