"""Tensor parallelism on MindSpore's CPU backend: msrun with 2 workers (mccl), against tp=1 and transformers.

Tolerances (float32): greedy tokens identical to tp=1's and to transformers' (their top-2 margin > 1e-3); logits at
every step within 1e-5 × max|logit| of tp=1's (the ranks' partial products are summed in another order: measured
1.9e-6 at most). Each msrun
launch takes 10-40 s, so there are few: one per config (every request kind runs on it), one for the CLI's --json,
and one each for a worker killed under the Python API and under the CLI.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import openai
import pytest
from serve_helpers import in_process_server, user_message
from test_runtime import REQUESTS, assert_two_runtimes_answer_as_transformers

from mindvl.apps.cli import main
from mindvl.errors import ArtifactError
from mindvl.runtime import Runtime
from mindvl.runtime.artifacts import read_weights
from mindvl.runtime.tensor_parallel import WorkerError
from mindvl.runtime.tp_rank import rank_weights
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.manifest import Manifest
from mindvl.shapes.parallel import TextShard, text_shard
from mindvl.shapes.weights import COLUMN, REPLICATED, text_weights

SPEC = {"images": ["112x112", "224x224"], "videos": [{"frames": 4, "size": "112x112"}], "batch": [1],
        "prefill": [64, 128], "cache": [256]}


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory):
    """`exports(preset)`: the checkpoint of that name and its tp=1 and tp=2 exports at SPEC, made once."""
    from mindvl.export import export_artifacts

    made = {}

    def get(preset):
        if preset not in made:
            model, folder = checkpoint(preset), tmp_path_factory.mktemp(f"tp-{preset}")
            for tp in (1, 2):
                export_artifacts(model, folder / f"tp{tp}", BucketSpec.from_dict({**SPEC, "tp": tp}),
                                 log=lambda line: None)
            made[preset] = model, folder / "tp1", folder / "tp2"
        return made[preset]

    return get


@pytest.fixture(scope="module", params=["tiny", "real-dims"])  # 4 heads / 2 kv heads split; 2 heads / 1 kv replicated
def pair(request, exports):
    """A checkpoint, its tp=1 and tp=2 exports, and a runtime of each (the tp=2 one with its 2 workers running)."""
    model, one, two = exports(request.param)
    runtimes = Runtime.load(one, prefix_cache_mb=0), Runtime.load(two, prefix_cache_mb=0)
    yield model, one, two, runtimes
    runtimes[1].close()


@pytest.mark.parametrize("kind", REQUESTS)
def test_tp2_answers_as_one_card_and_as_transformers(pair, kind):
    model, _, _, (one, two) = pair
    assert_two_runtimes_answer_as_transformers(model, REQUESTS[kind], two, one, rel=1e-5)


def test_each_rank_holds_its_slice_and_only_rank_0_the_vision_encoder(pair):
    _, one, two, _ = pair
    manifest = Manifest.read(two)
    t, aliases = manifest.config.text, manifest.weights["aliases"]
    whole = read_weights(one, Manifest.read(one), mapped=True)
    ranks = [rank_weights(two, manifest, rank) for rank in range(2)]
    vision = {e["name"] for e in manifest.weights["groups"]["vision"]}
    assert vision <= ranks[0].keys() and not vision & ranks[1].keys()
    for w in text_weights(t, 2).weights():
        name = aliases.get(w.name, w.name)
        parts = [r[name] for r in ranks]
        assert [p.shape for p in parts] == [w.shape] * 2, name
        kv = name.split(".")[-2] in ("k", "v")
        if w.split == REPLICATED or (kv and t.num_key_value_heads == 1):  # one kv head: every rank needs it
            assert all(np.array_equal(p, whole[name]) for p in parts), name
        else:
            assert np.array_equal(np.concatenate(parts, 0 if w.split == COLUMN else 1), whole[name]), name


def test_serving_a_tp2_artifact(pair):
    _, _, _, (one, two) = pair
    question = "Tell me about the sea."
    with in_process_server(two) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model=server.model, max_tokens=12, messages=user_message(question))
    assert answer.choices[0].message.content == one.generate(question, max_new_tokens=12).text


def test_generate_json_on_a_tp2_artifact_is_the_one_card_output(exports, tmp_path):
    _, one, two = exports("tiny")
    image = tmp_path / "image.png"
    REQUESTS["image"]["images"][0].save(image)
    outputs = []
    for artifacts in (one, two):
        run = subprocess.run([sys.executable, "-m", "mindvl", "generate", str(artifacts), "-p", "Describe this image.",
                              "--image", str(image), "--max-new-tokens", "8", "--json"],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(json.loads(run.stdout))
    for out in outputs:
        del out["timings_ms"]
    assert outputs[0] == outputs[1]


def test_export_refuses_a_tp_the_model_does_not_divide(checkpoint, tmp_path, capsys):
    model = checkpoint("tiny-gqa3")  # 3 heads
    assert main(["export", str(model), "-o", str(tmp_path / "out"), "--preset", "tiny", "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_attention_heads 3 does not divide by tp 2" in err and "(1, 3)" in err
    spec = tmp_path / "spec.yaml"
    spec.write_text("batch: [1]\nprefill: [64]\ncache: [256]\ntp: 2\n")
    assert main(["export", str(model), "-o", str(tmp_path / "out"), "--buckets", str(spec)]) == 2
    assert "num_attention_heads 3 does not divide by tp 2" in capsys.readouterr().err
    assert main(["export", str(checkpoint("tiny")), "-o", str(tmp_path / "out"), "--tp", "2", "--format", "onnx"]) == 2
    assert "tensor-parallel graphs are MindIR only" in capsys.readouterr().err
    spec.write_text("batch: [1]\nprefill: [64]\ncache: [256]\ntp: 0\n")
    assert main(["export", str(model), "-o", str(tmp_path / "out"), "--buckets", str(spec)]) == 2
    assert "tp: 0 must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def gone(pid):
    """Whether process `pid` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids, within=60.0):
    deadline = time.monotonic() + within
    while not all(gone(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} are still running"
        time.sleep(0.1)


def test_a_killed_worker_stops_the_group_with_one_line(exports):
    _, _, two = exports("tiny")
    runtime = Runtime.load(two, prefix_cache_mb=0)
    workers = runtime.artifacts.executor.stats()
    assert [w["rank"] for w in workers] == [0, 1] and all(w["peak_rss_bytes"] > 0 for w in workers)
    stream = runtime.stream("Write a short poem about the sea.", max_new_tokens=64)
    next(stream)  # decoding: the generator waits for us between tokens
    os.kill(workers[1]["pid"], signal.SIGKILL)
    with pytest.raises(WorkerError) as failed:
        list(stream)
    message = str(failed.value)
    assert "\n" not in message and "worker rank 1 exited" in message and "all 2 workers were stopped" in message
    wait_gone([w["pid"] for w in workers])
    with pytest.raises(ArtifactError, match="worker rank 1 exited"):  # at once: the group is known to be gone
        runtime.generate("Hello.", max_new_tokens=2)
    runtime.close()


def worker_pids(driver):
    """The tp workers (not msrun's scheduler) a driver process started."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as f:
                role = b"MS_ROLE=MS_SCHED" in f.read().split(b"\0")
        except OSError:
            continue
        if len(command) > 2 and command[1].endswith(b"tp_worker.py") and str(driver).encode() in command and not role:
            found.append(int(entry))
    return found


def test_the_cli_exits_with_one_line_when_a_worker_is_killed(exports):
    _, _, two = exports("tiny")
    cli = subprocess.Popen([sys.executable, "-m", "mindvl", "generate", str(two), "-p", "Write a poem.", "--stream",
                            "--max-new-tokens", "180"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = cli.stdout.read(1)  # the first piece of the answer: the workers are up and decoding
    assert first
    cli.send_signal(signal.SIGSTOP)  # holds the driver mid-generation while a worker dies
    workers = worker_pids(cli.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    cli.send_signal(signal.SIGCONT)
    _, err = cli.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert cli.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("mindvl: error: tensor parallelism failed: worker rank")
    wait_gone(workers)


def test_the_layout_of_the_published_models():
    from mindvl.shapes.config import ModelConfig
    from mindvl.shapes.parallel import ParallelError, rank_slice
    from mindvl.testing.architectures import HUB_CONFIGS

    text = {name: ModelConfig.from_hf(config).text for name, config in HUB_CONFIGS.items()}
    assert text_shard(text["7B"], 2) == TextShard(2, heads=14, kv_heads=2, intermediate=9472, vocab=76032)
    assert text_shard(text["72B"], 8) == TextShard(8, heads=8, kv_heads=1, intermediate=3696, vocab=19008)
    with pytest.raises(ParallelError, match=r"num_attention_heads 28 does not divide by tp 8: .*\(1, 2, 4, 7, 14, "):
        text_shard(text["7B"], 8)
    # 2B at tp 4: 3 query heads per rank, 6 per kv head, so ranks 0-1 read kv head 0 and ranks 2-3 kv head 1.
    d = text["2B"].head_dim
    kv = [rank_slice((2 * d, 1536), (d, 1536), r, 4)[0] for r in range(4)]
    assert kv == [slice(0, d), slice(0, d), slice(d, 2 * d), slice(d, 2 * d)]
    q = [rank_slice((12 * d,), (3 * d,), r, 4)[0] for r in range(4)]
    assert q == [slice(3 * d * r, 3 * d * (r + 1)) for r in range(4)]
