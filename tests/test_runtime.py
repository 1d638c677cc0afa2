"""Export → runtime against transformers and against our own model; cache state across requests.

Images are sized to buckets of the `tiny` preset (and the video has the bucket's 4 frames), so the runtime's
bucket policy resizes nothing and transformers' processor sees the very same pixels.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from media import sample_image, video_frames
from reference import hf_greedy, hf_inputs

from mindvl.qwen2vl import load
from mindvl.runtime import Runtime

REQUESTS = {
    "text": dict(text="Write a short poem about the sea."),
    "image": dict(text="Describe this image.", images=[sample_image(224, 224, seed=11)]),
    "two_images": dict(text="Compare the two pictures.",
                       images=[sample_image(224, 224, seed=12), sample_image(112, 112, seed=13)]),
    "video": dict(text="What happens in this video?", videos=[video_frames(4, 112, 112, seed=14)]),
}
NEW_TOKENS = 16


def ask(runtime, request, **settings):
    return runtime.generate(request["text"], images=request.get("images", ()), videos=request.get("videos", ()),
                            **settings)


def assert_two_runtimes_answer_as_transformers(model_dir, request, ours, reference, rel):
    """Two runtimes' answers to `request` (the runtime under test's, then the one it is checked against): both
    transformers' greedy tokens (whose top-2 margin leaves no tie), the same buckets, and logits within `rel` ×
    max|logit| of the reference's at every step."""
    got, same = (ask(rt, request, max_new_tokens=NEW_TOKENS, keep_logits=True) for rt in (ours, reference))
    expected, margin = hf_greedy(model_dir, hf_inputs(model_dir, **request), max_new_tokens=NEW_TOKENS)
    assert margin > 1e-3
    assert got.token_ids == same.token_ids == expected[0].tolist()
    assert got.buckets == same.buckets
    for mine, theirs in zip(got.logits, same.logits, strict=True):
        assert np.abs(mine - theirs).max() <= rel * np.abs(theirs).max()
    return got


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa3"])
def test_runtime_in_a_fresh_process_matches_transformers(exported, preset, tmp_path):
    model_dir, artifacts = exported(preset)
    requests = {}
    for name, r in REQUESTS.items():
        images = [tmp_path / f"{name}_{i}.png" for i in range(len(r.get("images", [])))]
        for path, image in zip(images, r.get("images", []), strict=True):
            image.save(path)
        videos = [tmp_path / f"{name}_{i}.npy" for i in range(len(r.get("videos", [])))]
        for path, frames in zip(videos, r.get("videos", []), strict=True):
            np.save(path, frames)
        requests[name] = {"text": r["text"], "images": [str(p) for p in images], "videos": [str(p) for p in videos],
                          "max_new_tokens": NEW_TOKENS}
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    child = Path(__file__).with_name("runtime_child.py")
    run = subprocess.run([sys.executable, str(child), str(artifacts), str(tmp_path / "requests.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert results["model_code_imported"] == []
    assert results["two_images"]["buckets"]["vision"] == ["vision_224x224", "vision_112x112"]
    assert results["video"]["buckets"]["vision"] == ["video_4x112x112"]
    for name, r in REQUESTS.items():
        expected, margin = hf_greedy(model_dir, hf_inputs(model_dir, **r), max_new_tokens=NEW_TOKENS)
        assert margin > 1e-3
        assert results[name]["token_ids"] == expected[0].tolist(), name


def test_prefill_then_decode_equals_a_full_forward(exported):
    model_dir, artifacts = exported("tiny")
    runtime, model = Runtime.load(artifacts), load(model_dir)
    request = REQUESTS["image"]
    out = runtime.generate(request["text"], images=request["images"], max_new_tokens=8, keep_logits=True)
    inputs = runtime.processor.prepare(request["text"], images=request["images"]).model_inputs()
    prompt = inputs["input_ids"].shape[1]
    sequence = np.concatenate([inputs["input_ids"], [out.token_ids[:-1]]], axis=1)
    full = model.logits(sequence, inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(out.logits) == 8
    for step, logits in enumerate(out.logits):
        expected = full[0, prompt - 1 + step]
        assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max(), f"step {step}"


def test_requests_do_not_leak_cache_state(exported):
    _, artifacts = exported("tiny")
    long, short = REQUESTS["two_images"], REQUESTS["text"]
    busy = Runtime.load(artifacts)
    first = ask(busy, long, max_new_tokens=NEW_TOKENS).token_ids
    second = ask(busy, short, max_new_tokens=NEW_TOKENS).token_ids
    third = ask(busy, long, max_new_tokens=NEW_TOKENS).token_ids
    assert ask(Runtime.load(artifacts), short, max_new_tokens=NEW_TOKENS).token_ids == second
    assert third == first


def test_stream_yields_the_generated_text(exported):
    _, artifacts = exported("tiny")
    runtime = Runtime.load(artifacts)
    request = REQUESTS["image"]
    out = ask(runtime, request, max_new_tokens=NEW_TOKENS)
    pieces = list(runtime.stream(request["text"], images=request["images"], max_new_tokens=NEW_TOKENS))
    assert "".join(pieces) == out.text and len(pieces) > 1
    assert out.timings.keys() >= {"vision", "prefill", "decode_per_token", "total"}


def test_sampling_is_seeded(exported):
    _, artifacts = exported("tiny")
    runtime = Runtime.load(artifacts)
    # The fixture's logits are large (std ~48): a high temperature is needed to see sampling spread.
    settings = dict(max_new_tokens=12, temperature=30.0, top_p=0.9, top_k=50)
    a = ask(runtime, REQUESTS["text"], seed=1, **settings).token_ids
    assert a == ask(runtime, REQUESTS["text"], seed=1, **settings).token_ids
    assert a != ask(runtime, REQUESTS["text"], seed=2, **settings).token_ids
    assert a != ask(runtime, REQUESTS["text"], max_new_tokens=12).token_ids
