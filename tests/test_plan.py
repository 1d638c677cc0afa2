"""`mindvl plan`: plans known by hand, determinism, a planned spec exported and run on its own workload, and every
bad input a one-line error (exit 2) naming the problem and the fix.

The tiny checkpoint's preprocessor keeps Qwen2-VL's pixel limits (3136 .. 12845056), so an image's native size is
its own size rounded to multiples of 28 (a 448x336 image: 16 x 12 = 192 tokens, a 224x224 one: 64).
"""

from __future__ import annotations

import json

import openai
import pytest
import yaml
from media import sample_image
from serve_helpers import data_url, in_process_server, user_message

from mindvl.apps.cli import main
from mindvl.plan.command import run_plan
from mindvl.shapes.buckets import BucketSpec


def logged(images, text_tokens=30, max_tokens=16, videos=()) -> str:
    """A `mindvl serve --log-shapes` line."""
    return json.dumps({"images": [list(i) for i in images], "videos": list(videos), "text_tokens": text_tokens,
                       "max_tokens": max_tokens})


def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# Two clusters: 448x336 and 440x330 photos (both 448x336 natively, 4:3), 220x220 and 230x230 icons (224x224).
CLUSTERS = [logged([(448, 336)]), logged([(440, 330)]), logged([(220, 220)], 40), logged([(230, 230)], 40)] * 5


def test_two_clusters_and_a_budget_for_two_image_buckets_give_those_two(model_dir, tmp_path):
    workload = write_lines(tmp_path / "w.jsonl", CLUSTERS)
    # 4 graphs: two image buckets, one cache's decode graph and one prefill graph.
    report = run_plan(model_dir, workload, tmp_path / "plan.yaml", max_graphs=4)
    spec = BucketSpec.from_yaml(tmp_path / "plan.yaml")
    assert [b.name for b in spec.images] == ["224x224", "448x336"]
    planned = report["plans"]["planned"]
    assert planned["graphs"] == 4 and planned["below_floor"] == 0 and planned["per_request"]["waste_tokens"] == 0
    assert planned["refused"] == 0 and len(spec.cache) == len(spec.prefill) == 1


def test_text_lengths_follow_the_prompts(model_dir, tmp_path):
    # Prompts of 100 and 200 tokens with 16 new: caches are multiples of 128, so one of 256 holds both; 3 graphs
    # leave two prefill lengths (multiples of 32): 128 and 224 pad 28 and 24 tokens, and any other pair pads more
    # (a 128-slot cache for the short prompt would cost a graph and pad it to 224, the only length pairing 256).
    workload = write_lines(tmp_path / "w.jsonl", [logged([], 100), logged([], 200)] * 3)
    run_plan(model_dir, workload, tmp_path / "plan.yaml", max_graphs=3)
    spec = BucketSpec.from_yaml(tmp_path / "plan.yaml")
    assert (spec.images, spec.cache, spec.prefill) == ((), (256,), (128, 224))


def test_one_image_bucket_takes_the_one_that_keeps_every_image_above_the_floor(model_dir, tmp_path):
    # 3 graphs leave one image bucket. 224x224 alone keeps 64 * 3/4 = 48 of a photo's 192 tokens, below the
    # floor (96); 448x336 keeps all of an icon's 64 (wasting 128): the plan takes 448x336.
    workload = write_lines(tmp_path / "w.jsonl", CLUSTERS)
    report = run_plan(model_dir, workload, tmp_path / "plan.yaml", max_graphs=3)
    assert [b["bucket"] for b in report["plans"]["planned"]["buckets"]] == ["448x336"]
    assert report["plans"]["planned"]["below_floor"] == 0


def test_the_same_workload_gives_the_same_plan(model_dir, tmp_path):
    lines = CLUSTERS + [logged([(600, 300)], 500, 64), logged([(100, 900)], 20, 300)]
    workload = write_lines(tmp_path / "w.jsonl", lines)
    run_plan(model_dir, workload, tmp_path / "a.yaml", max_graphs=8)
    write_lines(tmp_path / "w.jsonl", lines)
    run_plan(model_dir, workload, tmp_path / "b.yaml", max_graphs=8)
    assert (tmp_path / "a.yaml").read_bytes() == (tmp_path / "b.yaml").read_bytes()


def test_against_scores_a_spec_side_by_side(model_dir, tmp_path, capsys):
    workload = write_lines(tmp_path / "w.jsonl", CLUSTERS)
    assert main(["plan", str(model_dir), "--workload", workload, "-o", str(tmp_path / "p.yaml"), "--max-graphs", "4",
                 "--against", "tiny", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    tiny = report["plans"]["against"]
    # The tiny preset's 224x168 is the largest 4:3 bucket: a 448x336 photo keeps 48 of its 192 tokens there.
    assert tiny["spec"]["images"] == BucketSpec.preset("tiny").to_dict()["images"]
    assert tiny["below_floor"] == 0.5 and tiny["per_request"]["lost_tokens"] == pytest.approx(72)
    assert report["plans"]["planned"]["per_request"]["lost_tokens"] == 0
    table = capsys.readouterr().out
    assert "| inputs below the floor | 0.0% | 50.0% |" in table and "wrote " in table


def body(text, images=(), max_tokens=8) -> str:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return json.dumps({"model": "m", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]})


def test_a_planned_spec_exports_and_its_workload_takes_the_buckets_the_report_predicted(checkpoint, tmp_path):
    from mindvl.export import export_artifacts
    from mindvl.runtime import Runtime

    model = checkpoint("tiny")
    requests = [("Describe it.", [sample_image(200, 150, seed=1)]), ("What is this?", [sample_image(112, 112, seed=2)]),
                ("And these?", [sample_image(150, 200, seed=3), sample_image(112, 112, seed=4)]),
                ("Say hello.", [])]
    workload = write_lines(tmp_path / "bodies.jsonl", [body(text, images) for text, images in requests])
    report = run_plan(model, workload, tmp_path / "plan.yaml", max_graphs=6)
    spec = BucketSpec.from_yaml(tmp_path / "plan.yaml")
    export_artifacts(model, tmp_path / "artifacts", spec, log=lambda line: None)
    runtime = Runtime.load(tmp_path / "artifacts", prefix_cache_mb=0, vision_cache_mb=0)
    used, prompt_tokens = {}, 0
    for text, images in requests:
        out = runtime.generate(text, images=images, max_new_tokens=8)
        for graph in out.buckets["vision"]:
            used[graph.removeprefix("vision_")] = used.get(graph.removeprefix("vision_"), 0) + 1
        prompt_tokens += out.prompt_tokens
    planned = report["plans"]["planned"]
    assert used == pytest.approx({b["bucket"]: b["share"] * report["workload"]["images"] for b in planned["buckets"]})
    # The plan counted each prompt's text through the chat template and its images at their buckets: the runtime's
    # prompts are as long as the plan's.
    assert prompt_tokens == pytest.approx(planned["per_request"]["prompt_tokens"] * len(requests))
    # And served: the planned artifact answers through `mindvl serve` as through the runtime.
    text, images = requests[2]
    with in_process_server(runtime) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=server.model, max_tokens=8, messages=user_message(text, images))
    assert reply.choices[0].message.content == runtime.generate(text, images=images, max_new_tokens=8).text


# --- bad input: one line, exit 2 --------------------------------------------------------------------------------


def tall_png_url() -> str:
    return data_url(sample_image(1, 10000, seed=5))


BAD = {
    "missing": (lambda d: str(d / "none.jsonl"), [], ["does not exist", "JSONL"]),
    "empty": (lambda d: write_lines(d / "w.jsonl", [""]), [], ["holds no requests"]),
    "not_utf8": (lambda d: (d / "w.jsonl").write_bytes(b"\xff\xfe\x00") and str(d / "w.jsonl"), [], ["UTF-8"]),
    "not_json": (lambda d: write_lines(d / "w.jsonl", ["{oops"]), [], ["w.jsonl:1", "not JSON"]),
    "not_a_request": (lambda d: write_lines(d / "w.jsonl", [logged([(224, 224)]), json.dumps({"prompt": "hi"})]), [],
                      ["w.jsonl:2", "neither a chat-completion request", "remove the line"]),
    "aspect": (lambda d: write_lines(d / "w.jsonl", [json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": tall_png_url()}}]}]})]), [], ["1x10000", "200:1", "crop"]),
    "network": (lambda d: write_lines(d / "w.jsonl", [json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})]), [],
        ["network", "data: URL", "--log-shapes"]),
    "one_frame_video": (lambda d: write_lines(d / "w.jsonl", [logged([], videos=[
        {"frames": 1, "height": 224, "width": 224, "fps": 2}])]), [], ["1 frame", "at least 2", "as an image"]),
    "too_few_graphs": (lambda d: write_lines(d / "w.jsonl", CLUSTERS), ["--max-graphs", "2"],
                       ["--max-graphs 2", "at least 3", "raise --max-graphs"]),
    "too_little_memory": (lambda d: write_lines(d / "w.jsonl", CLUSTERS), ["--max-memory", "0.00001"],
                          ["--max-memory", "raise --max-memory to"]),
    "no_media_in_folder": (lambda d: (d / "media").mkdir() or str(d / "media"), [], ["holds no images"]),
    "bad_floor": (lambda d: write_lines(d / "w.jsonl", CLUSTERS), ["--floor", "1.5"], ["--floor 1.5", "from 0 to 1"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_fix(model_dir, tmp_path, capsys, case):
    make, flags, words = BAD[case]
    workload = make(tmp_path)
    code = main(["plan", str(model_dir), "--workload", workload, "-o", str(tmp_path / "p.yaml"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("mindvl: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "p.yaml").exists()  # nothing half-written


def test_the_planned_yaml_is_a_normal_bucket_spec(model_dir, tmp_path):
    workload = write_lines(tmp_path / "w.jsonl", CLUSTERS)
    run_plan(model_dir, workload, tmp_path / "plan.yaml", max_graphs=4, floor=0.4)
    d = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert set(d) == {"images", "batch", "prefill", "cache", "dtype", "fidelity_floor"}
    assert BucketSpec.from_dict(d).fidelity_floor == 0.4


def test_a_folder_with_a_prompt_length_distribution_and_a_plot(model_dir, tmp_path):
    (tmp_path / "media").mkdir()
    sample_image(448, 336, seed=7).save(tmp_path / "media" / "photo.png")
    sample_image(224, 224, seed=8).save(tmp_path / "media" / "icon.jpg")
    (tmp_path / "media" / "notes.txt").write_text("not media")
    assert main(["plan", str(model_dir), "--workload", str(tmp_path / "media"), "-o", str(tmp_path / "p.yaml"),
                 "--prompt-tokens", "20:1,60:3", "--max-graphs", "4", "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    # Each file is one request per prompt length, weighted by its share: 2 requests, 2 images in all.
    assert (report["workload"]["requests"], report["workload"]["images"]) == (2, 2)
    assert [b.name for b in BucketSpec.from_yaml(tmp_path / "p.yaml").images] == ["224x224", "448x336"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_buckets_follow_the_logged_concurrency(model_dir, tmp_path):
    # Requests of 2.5 s arriving every second: 3 in flight at most arrivals -> batch buckets 1 and 4.
    lines = [json.dumps({**json.loads(logged([(224, 224)])), "time": 1000.0 + i, "duration_s": 2.5})
             for i in range(20)]
    run_plan(model_dir, write_lines(tmp_path / "w.jsonl", lines), tmp_path / "plan.yaml", max_graphs=6)
    assert BucketSpec.from_yaml(tmp_path / "plan.yaml").batch == (1, 4)
    # Lines without timings give batch 1; --batch overrides.
    run_plan(model_dir, write_lines(tmp_path / "w.jsonl", CLUSTERS), tmp_path / "plan.yaml", max_graphs=6)
    assert BucketSpec.from_yaml(tmp_path / "plan.yaml").batch == (1,)
    run_plan(model_dir, tmp_path / "w.jsonl", tmp_path / "plan.yaml", max_graphs=6, batch=(1, 2))
    assert BucketSpec.from_yaml(tmp_path / "plan.yaml").batch == (1, 2)
