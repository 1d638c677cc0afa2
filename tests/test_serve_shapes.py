"""What `mindvl serve` tells `mindvl plan` about its traffic, against a live server on loopback: `--log-shapes FILE`
appends one line per chat completion with its shapes (image and video sizes from their headers, token counts) and
none of its content; /metrics counts per graph the inputs each bucket took and the tokens it padded or lost, exactly
as the fit rule computes them for those inputs; a log that cannot be opened stops the server before it starts.
"""

import json
import re
import stat
import subprocess
import sys
import time

import httpx
import openai
import pytest
from media import sample_image, write_sample_video
from serve_helpers import running_server, user_message, wait_for

from mindvl.shapes.buckets import BucketSpec, choose_image_bucket, choose_text_buckets, choose_video_bucket
from mindvl.shapes.image import ProcessorConfig
from mindvl.shapes.manifest import Manifest

KEYS = ["time", "duration_s", "images", "videos", "prompt_tokens", "text_tokens", "max_tokens", "generated_tokens"]
VIDEO = dict(frames=8, height=200, width=120, fps=4)
# Words that appear in no chat template: if the log held any of the prompts' text, these would show.
SECRETS = ("zebraquokka", "marmalade-nebula", "xylophonic")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    write_sample_video(folder / "clip.mp4", frames=VIDEO["frames"], size=(VIDEO["height"], VIDEO["width"]),
                       fps=VIDEO["fps"])
    return folder


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes") / "shapes.jsonl"


@pytest.fixture(scope="module")
def server(exported, media, log, tmp_path_factory):
    with running_server(exported("tiny")[1], tmp_path_factory.mktemp("logs"), "--media-dir", str(media),
                        "--log-shapes", str(log)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def fitting(exported):
    """The artifact's buckets and the model's pixel limits, as the fit rule takes them."""
    config = ProcessorConfig.from_dir(exported("tiny")[1] / "tokenizer")
    spec = BucketSpec.preset("tiny")  # what `exported` exports at
    return spec, config, {"factor": config.factor, "min_pixels": config.min_pixels, "max_pixels": config.max_pixels,
                          "floor": spec.fidelity_floor}


def entries(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def image_tokens(h, w, fitting) -> int:
    spec, _, fit = fitting
    return choose_image_bucket(h, w, spec.images, **fit).fit.tokens


def test_each_request_appends_its_shapes_and_nothing_of_its_content(server, client, log, fitting):
    image = sample_image(200, 120, seed=31)
    before, start = len(entries(log)), time.time()
    with_image = client.chat.completions.create(model=server.model, max_tokens=7,
                                                messages=user_message(f"Is there a {SECRETS[0]} here?", [image]))
    text_only = client.chat.completions.create(model=server.model, max_tokens=5, messages=[
        {"role": "system", "content": f"You like {SECRETS[1]}."}, {"role": "user", "content": SECRETS[2]}])
    end = time.time()
    new = entries(log)[before:]
    assert len(new) == 2
    for entry, reply in zip(new, (with_image, text_only), strict=True):
        assert list(entry) == KEYS
        assert start <= entry["time"] <= end and 0 < entry["duration_s"] <= end - entry["time"]
        assert isinstance(entry["time"], float) and isinstance(entry["duration_s"], float)
        assert entry["prompt_tokens"] == reply.usage.prompt_tokens
        assert entry["generated_tokens"] == reply.usage.completion_tokens
    # text_tokens: the prompt but its visual tokens, which the buckets decide.
    assert {k: new[0][k] for k in KEYS[2:]} == {
        "images": [[200, 120]], "videos": [], "max_tokens": 7, "prompt_tokens": with_image.usage.prompt_tokens,
        "text_tokens": with_image.usage.prompt_tokens - image_tokens(200, 120, fitting),
        "generated_tokens": with_image.usage.completion_tokens}
    assert {k: new[1][k] for k in KEYS[2:]} == {"images": [], "videos": [], "max_tokens": 5,
                                                "prompt_tokens": text_only.usage.prompt_tokens,
                                                "text_tokens": text_only.usage.prompt_tokens,
                                                "generated_tokens": text_only.usage.completion_tokens}
    text = log.read_text()
    assert not any(secret in text for secret in SECRETS)
    assert "base64" not in text and "data:" not in text and "iVBOR" not in text  # iVBOR: a PNG's first bytes
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_streamed_video_request_logs_the_video_header_and_the_default_max_tokens(server, client, log, fitting):
    before = len(entries(log))
    chunks = list(client.chat.completions.create(
        model=server.model, stream=True, stream_options={"include_usage": True},
        messages=user_message("What happens?", videos=["clip.mp4"])))
    usage = chunks[-1].usage
    wait_for(lambda: len(entries(log)) > before, within=30)  # a stream's line is written once it has ended
    [entry] = entries(log)[before:]
    assert list(entry) == KEYS and entry["images"] == [] and entry["videos"] == [{**VIDEO, "fps": 4.0}]
    assert (entry["prompt_tokens"], entry["generated_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    spec, _, fit = fitting
    video = choose_video_bucket(VIDEO["frames"], VIDEO["fps"], VIDEO["height"], VIDEO["width"], spec.videos, **fit)
    assert entry["text_tokens"] == usage.prompt_tokens - video.fit.tokens * (video.bucket.frames // 2)
    largest_cache = BucketSpec.preset("tiny").cache[-1]
    assert entry["max_tokens"] == largest_cache - usage.prompt_tokens  # the server's default: what fits


def test_a_request_refused_after_its_media_is_read_is_logged_and_one_refused_before_is_not(server, log, fitting):
    before = len(entries(log))
    url = f"{server.url}/v1/chat/completions"
    body = {"model": server.model, "max_tokens": 100_000,
            "messages": user_message("Too long an answer.", [sample_image(120, 200, seed=32)])}
    refused = httpx.post(url, json=body, timeout=60)
    assert refused.status_code == 400
    prompt_tokens = int(re.search(r"the prompt \((\d+) tokens\)", refused.json()["error"]["message"])[1])
    for early in (b"{not json", json.dumps({**body, "top_p": 2}).encode()):  # refused before media are read
        response = httpx.post(url, content=early, headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code in (400, 422)
    [entry] = entries(log)[before:]
    assert {k: entry[k] for k in KEYS[2:]} == {"images": [[120, 200]], "videos": [], "prompt_tokens": prompt_tokens,
                                               "text_tokens": prompt_tokens - image_tokens(120, 200, fitting),
                                               "max_tokens": 100_000, "generated_tokens": 0}


def bucket_series(text: str) -> dict[tuple[str, str], float]:
    """(name without mindvl_bucket_ and _total, graph) -> value, of /metrics' text."""
    return {(m[1], m[2]): float(m[3])
            for m in re.finditer(r'^mindvl_bucket_(\w+)_total\{graph="([^"]+)"\} (\S+)$', text, re.M)}


def test_metrics_count_what_each_bucket_padded_and_lost_as_the_fit_rule_computes(server, client, fitting):
    spec, config, limits = fitting
    metrics = f"{server.url}/metrics"
    before = bucket_series(httpx.get(metrics, timeout=10).text)
    reply = client.chat.completions.create(model=server.model, max_tokens=6, messages=user_message(
        "Compare the picture with the clip.", [sample_image(300, 100, seed=33)], ["clip.mp4"]))
    text = httpx.get(metrics, timeout=10).text
    for name in ("inputs", "padded_tokens", "lost_tokens", "requests"):
        assert f"# HELP mindvl_bucket_{name}_total " in text
    after = bucket_series(text)
    grown = {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}

    image = choose_image_bucket(300, 100, spec.images, **limits)
    video = choose_video_bucket(VIDEO["frames"], VIDEO["fps"], VIDEO["height"], VIDEO["width"], spec.videos, **limits)
    groups = video.bucket.frames // config.temporal_patch_size  # each temporal patch of frames is one frame's tokens
    details = reply.usage.prompt_tokens_details  # a prefix the server's cache held is not prefilled again
    prompt = choose_text_buckets(reply.usage.prompt_tokens, 6, spec, 1, reused=details.cached_tokens if details else 0)
    vision, clip = f"vision_{image.bucket.name}", f"video_{video.bucket.name}"
    prefill = f"prefill_b{prompt.batch}_s{prompt.prefill}_c{prompt.cache}"
    assert image.fit.waste and image.fit.lost and video.fit.waste and video.fit.lost  # nothing is trivially 0
    expected = {
        ("inputs", vision): 1, ("padded_tokens", vision): round(float(image.fit.waste)),
        ("lost_tokens", vision): round(float(image.fit.lost)),
        ("inputs", clip): 1, ("padded_tokens", clip): round(float(video.fit.waste * groups)),
        ("lost_tokens", clip): round(float(video.fit.lost * groups)),
        ("requests", prefill): 1, ("padded_tokens", prefill): prompt.padding_tokens,
    }
    assert grown == {key: value for key, value in expected.items() if value}


@pytest.mark.parametrize("where", ["no-such-folder/shapes.jsonl", "."])
def test_a_log_that_cannot_be_opened_stops_the_server_with_one_line_naming_it(exported, tmp_path, where):
    path = tmp_path / where  # a file in a missing folder; a folder
    done = subprocess.run([sys.executable, "-m", "mindvl", "serve", str(exported("tiny")[1]), "--log-shapes",
                           str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "serving" not in done.stdout
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("mindvl: error: --log-shapes") and str(path) in line, done.stderr


def test_mindvl_plan_reads_the_log_and_predicts_the_prompts_the_server_counted(server, client, log, exported,
                                                                               tmp_path):
    from mindvl.plan.command import run_plan
    from mindvl.plan.cost import CostModel
    from mindvl.plan.evaluate import evaluate
    from mindvl.plan.workload import read_workload

    artifacts = exported("tiny")[1]
    client.chat.completions.create(model=server.model, max_tokens=4,
                                   messages=user_message("Once more.", [sample_image(200, 120, seed=33)]))
    lines = entries(log)
    requests = read_workload(log, artifacts / "tokenizer")
    assert len(requests) == len(lines)
    # Scored at the served artifact's own buckets, the log's requests have the prompts the server counted (those
    # the server refused for their length are refused by the plan's text rule too).
    config = ProcessorConfig.from_dir(artifacts / "tokenizer")
    served = evaluate(BucketSpec.preset("tiny"), requests, CostModel(Manifest.read(artifacts).config), config)
    answered = [line for line in lines if line["generated_tokens"]]
    assert served.prompt_tokens == sum(line["prompt_tokens"] for line in answered)
    assert served.requests - served.refused == len(answered)
    # Planned from the artifact folder: its export's measured graph sizes and times predict the plan's.
    report = run_plan(artifacts, log, tmp_path / "plan.yaml", max_graphs=8)
    planned = report["plans"]["planned"]
    assert planned["refused"] == 0 and planned["export_s"] > 0 and planned["disk_bytes"] > planned["weights_bytes"]
