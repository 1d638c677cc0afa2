"""ONNX graphs run by onnxruntime, against transformers and against the MindIR runtime on the same artifacts.

Tolerances (float32): greedy tokens identical to transformers' (its top-2 margin > 1e-3) and to the MindIR runtime's;
logits at every step within 1e-4 × max|logit| of the MindIR runtime's, the bound the model keeps against transformers
(measured: 1e-6 for text, 1.1e-5 with images, whose encoder's norms and softmaxes the two executors sum in other
orders). The KV cache is written in place: each `present` output is bound to its cache input's own buffer.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from conftest import BATCH4_SPEC
from serve_helpers import in_process_server, user_message
from test_runtime import REQUESTS, assert_two_runtimes_answer_as_transformers

from mindvl.apps.cli import main
from mindvl.runtime import Runtime
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.manifest import MANIFEST


@pytest.fixture(scope="module", params=["tiny", "tiny-gqa3"])
def both(request, checkpoint, tmp_path_factory):
    """A checkpoint and its export at the `tiny` preset in both formats."""
    from mindvl.export import export_artifacts

    model = checkpoint(request.param)
    out = tmp_path_factory.mktemp(f"onnx-{request.param}") / "artifacts"
    export_artifacts(model, out, BucketSpec.preset("tiny"), log=lambda line: None, formats=("mindir", "onnx"))
    return model, out


@pytest.mark.parametrize("kind", REQUESTS)
def test_onnx_answers_as_transformers_and_as_mindir(both, kind):
    model, artifacts = both
    onnx = Runtime.load(artifacts, fmt="onnx", prefix_cache_mb=0)
    mindir = Runtime.load(artifacts, fmt="mindir", prefix_cache_mb=0)
    assert (onnx.artifacts.format, mindir.artifacts.format) == ("onnx", "mindir")
    got = assert_two_runtimes_answer_as_transformers(model, REQUESTS[kind], onnx, mindir, rel=1e-4)
    if kind == "two_images":
        assert got.buckets["vision"] == ["vision_224x224", "vision_112x112"]  # two buckets, two graphs


def test_the_vision_encoder_keeps_the_exact_gelu(both):
    # The merger's GELU is erf's, as the reference's: a tanh approximation would move the visual tokens by ~4e-4.
    import onnx

    _, artifacts = both
    graph = onnx.load(str(artifacts / "graphs" / "vision_224x224.onnx")).graph
    kinds = {node.op_type for node in graph.node}
    assert "Erf" in kinds and "Tanh" not in kinds and not graph.initializer  # and no weight baked in
    onnx_rt, mindir = (Runtime.load(artifacts, fmt=f, vision_cache_mb=0) for f in ("onnx", "mindir"))
    ours, theirs = (rt.artifacts.manifest.find("vision", frames=1, height=224, width=224) for rt in (onnx_rt, mindir))
    rng = np.random.default_rng(3)
    inputs = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in ours.inputs}
    ours, theirs = onnx_rt.artifacts.run(ours, inputs), mindir.artifacts.run(theirs, inputs)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()  # measured 1.3e-5 and 2.7e-5


def test_the_kv_cache_is_written_in_place(both):
    _, artifacts = both
    runtime = Runtime.load(artifacts, fmt="onnx", prefix_cache_mb=0)
    graphs = runtime.artifacts.executor
    spec = runtime.artifacts.manifest.find("prefill", batch=1, seq=64, cache=256)
    caches = graphs.caches(spec, 0)
    before = [c.data_ptr() for c in caches]
    prompt = runtime.processor.prepare("Hello.")
    n = prompt.input_ids.shape[1]
    fed = {"embeds": np.zeros((1, 64, runtime.config.text.hidden_size), np.float32),
           "position_ids": np.tile(np.arange(64, dtype=np.int32), (3, 1, 1)),
           "cache_positions": np.arange(64, dtype=np.int32)[None],
           "mask": np.zeros((1, 64, 256), np.float32), "logits_index": np.array([[n - 1]], np.int32)}
    fed["embeds"][0, :n] = runtime.artifacts.embed[prompt.input_ids[0]]
    binding = graphs.bind(spec, [fed[t.name] for t in spec.inputs], 0)
    graphs.graph(spec).run_with_iobinding(binding)
    presents = binding.get_outputs()[1:]
    assert [p.data_ptr() for p in presents] == [c.data_ptr() for c in caches] == before
    written = caches[0].numpy().reshape(runtime.config.text.num_key_value_heads, 256, -1)
    assert np.abs(written[:, :64]).max() > 0 and np.abs(written[:, 64:]).max() == 0  # slots 0..63 only


def test_batched_serving_on_an_onnx_artifact(checkpoint, tmp_path_factory):
    from mindvl.export import export_artifacts

    out = tmp_path_factory.mktemp("onnx-batch4") / "artifacts"
    export_artifacts(checkpoint("tiny"), out, BucketSpec.from_dict(BATCH4_SPEC), log=lambda line: None,
                     formats=("onnx",))
    runtime = Runtime.load(out)  # an artifact of ONNX graphs alone runs them
    assert runtime.artifacts.format == "onnx"
    questions = ["Tell me about the sea.", "Count to five.", "What is a tree?", "Describe this image."]
    singles = {q: Runtime.load(out, prefix_cache_mb=0).generate(q, max_new_tokens=12).text for q in questions}
    with in_process_server(runtime) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(len(questions)) as pool:
            answers = {q: pool.submit(client.chat.completions.create, model=server.model, max_tokens=12,
                                      messages=user_message(q)) for q in questions}
        for q, answer in answers.items():
            assert answer.result(120).choices[0].message.content == singles[q], q
        assert server.metric("mindvl_decode_rows_total") > server.metric("mindvl_decode_steps_total")  # batched


def test_inspect_verify_runs_onnx_full_check(both, capsys):
    _, artifacts = both
    assert main(["inspect", str(artifacts), "--verify"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"prefill_b1_s64_c256 +prefill +onnx", out) and "26 graphs load" in out


# --- bad input: one line, exit 2 --------------------------------------------------------------------------------


def copy_of(artifacts, tmp_path):
    return shutil.copytree(artifacts, tmp_path / "copy")


def relist(folder, relative):
    """Make the manifest list the file's current size and hash, as a tampered manifest would."""
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / relative).read_bytes()
    manifest["files"][relative].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / MANIFEST).write_text(json.dumps(manifest))


def generate_error(folder, capsys, *flags):
    code = main(["generate", str(folder), "-p", "Hi", "--max-new-tokens", "2", "--format", "onnx", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("mindvl: error: "), err
    return err


def test_a_corrupted_onnx_file_is_one_line(both, tmp_path, capsys):
    folder = copy_of(both[1], tmp_path)
    graph = folder / "graphs" / "prefill_b1_s64_c256.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    assert "does not match its sha256" in generate_error(folder, capsys)
    relist(folder, "graphs/prefill_b1_s64_c256.onnx")  # the manifest tampered to match: onnxruntime refuses it
    err = generate_error(folder, capsys)
    assert "prefill_b1_s64_c256.onnx cannot be loaded by onnxruntime" in err and "re-export" in err


def test_a_graph_whose_inputs_disagree_with_the_manifest_is_one_line(both, tmp_path, capsys):
    folder = copy_of(both[1], tmp_path)
    graphs = folder / "graphs"
    (graphs / "prefill_b1_s64_c256.onnx").write_bytes((graphs / "prefill_b1_s128_c256.onnx").read_bytes())
    relist(folder, "graphs/prefill_b1_s64_c256.onnx")
    err = generate_error(folder, capsys)
    assert "prefill_b1_s64_c256.onnx's inputs disagree with manifest.json" in err and "[1, 128, " in err


def test_onnxruntime_missing_is_one_line(both, tmp_path):
    # A fresh interpreter in which onnx and onnxruntime cannot be imported.
    block = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['onnx'] = None; "
             "from mindvl.apps.cli import main; sys.exit(main(sys.argv[1:]))")
    model, artifacts = both
    runs = {"generate": ["generate", str(artifacts), "-p", "Hi", "--format", "onnx"],
            "export": ["export", str(model), "-o", str(tmp_path / "out"), "--preset", "tiny", "--format", "onnx"]}
    for what, argv in runs.items():
        run = subprocess.run([sys.executable, "-c", block, *argv], capture_output=True, text=True, timeout=300,
                             env={"GLOG_v": "3", "PATH": ""})
        err = run.stderr.strip()
        assert run.returncode == 2 and err.count("\n") == 0, (what, err)
        assert 'pip install "mindvl[onnx]"' in err, (what, err)
    assert not (tmp_path / "out").exists()
    # The MindIR path needs neither.
    run = subprocess.run([sys.executable, "-c", block, "generate", str(artifacts), "-p", "Hi", "--max-new-tokens",
                          "2"], capture_output=True, text=True, timeout=300, env={"GLOG_v": "3", "PATH": ""})
    assert run.returncode == 0, run.stderr


def test_onnx_export_refuses_other_dtypes(checkpoint, tmp_path, capsys):
    code = main(["export", str(checkpoint("tiny")), "-o", str(tmp_path / "out"), "--preset", "tiny",
                 "--format", "onnx", "--dtype", "float16"])
    err = capsys.readouterr().err
    assert code == 2 and "--format onnx writes float32 graphs" in err and not (tmp_path / "out").exists()
