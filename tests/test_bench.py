"""`mindvl bench`: every mode runs, the report has its stable keys, the roofline arithmetic is right."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mindvl.apps.cli import main
from mindvl.bench.benchmark import decode_bytes
from mindvl.shapes.config import ModelConfig
from mindvl.shapes.manifest import Manifest
from mindvl.testing.architectures import HUB_CONFIGS

KEYS = {"mode", "load_s", "cold_start_s", "warmup_s", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_p50",
        "decode_ms_p90", "tokens_per_s", "peak_rss_bytes", "decode_vs_roofline", "decode_steps"}


def test_decode_bytes_of_the_2b_shapes():
    cfg = ModelConfig.from_hf(HUB_CONFIGS["2B"])
    # Per layer: q 1536x1536, k and v 256x1536 each, o 1536x1536, gate/up/down 3 x 1536x8960, two norms of 1536.
    layer = 1536 * 1536 + 2 * 256 * 1536 + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    weights = 28 * layer + 151936 * 1536 + 1536  # + the (tied) LM head and the final norm
    cache = 2 * 28 * 2 * 128 * 100  # keys and values of 100 filled slots
    assert decode_bytes(cfg, "float32", 100) == 4 * (weights + cache)
    assert decode_bytes(cfg, "float16", 100) == 2 * (weights + cache)


def test_bench_runs_every_mode(exported, tmp_path, capsys):
    model_dir, _ = exported("tiny")
    report_file, plot_file = tmp_path / "report.json", tmp_path / "report.png"
    assert main(["bench", str(model_dir), "--new-tokens", "4", "--repeats", "1", "--prompt-tokens", "8",
                 "--workdir", str(tmp_path / "work"), "--json", str(report_file), "--plot", str(plot_file)]) == 0
    report = json.loads(report_file.read_text())
    assert [r["mode"] for r in report["results"]] == ["runtime", "onnx", "graph", "pynative", "transformers"]
    for result in report["results"]:
        assert KEYS <= result.keys(), result.keys() ^ KEYS
        assert result["decode_steps"] == 3 and result["decode_ms_p50"] > 0
    assert report["results"][0]["export_s"] > 0 and report["roofline_decode_ms"] > 0
    assert {"machine", "model", "workload", "bandwidth_gb_s"} <= report.keys()
    assert report["workload"]["interleaved"] is True
    assert plot_file.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "× roofline" in table and "transformers" in table


def test_artifacts_alone_need_the_model_for_other_modes(exported, capsys):
    _, artifacts = exported("tiny")
    assert main(["bench", str(artifacts), "--modes", "runtime,graph"]) == 2
    assert "pass --model MODEL_DIR or --modes runtime,onnx" in capsys.readouterr().err


def test_op_profile_accounts_for_a_graph_op_by_op(exported):
    _, artifacts = exported("tiny")
    decode = next(g.name for g in Manifest.read(artifacts).graphs if g.kind == "decode")
    script = Path(__file__).resolve().parent.parent / "bench" / "op_profile.py"
    run = subprocess.run([sys.executable, str(script), str(artifacts), "--graph", decode, "--runs", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    types, slowest = run.stdout.split("| slowest ops |")
    shares = [float(line.rsplit("|", 2)[1].strip(" %")) for line in types.splitlines() if line.endswith("% |")]
    assert "| MatMul |" in types and abs(sum(shares) - 100) < 1, run.stdout
    ops = [line.split(" | ") for line in slowest.splitlines() if line.endswith("% |")]
    assert len(ops) == 10 and all("[" in op[1] for op in ops), slowest  # each with its input shapes

    listing = subprocess.run([sys.executable, str(script), str(artifacts)], capture_output=True, text=True, timeout=600)
    assert listing.returncode != 0 and decode in listing.stderr


def test_modes_run_one_after_another_when_their_weights_do_not_fit_together(exported, tmp_path, monkeypatch):
    """Also: without --workdir, the export goes to a temporary folder that is gone afterwards."""
    from mindvl.bench import benchmark

    assert benchmark.interleave(4, 10**6) and not benchmark.interleave(4, 10**13)
    monkeypatch.setattr(benchmark, "interleave", lambda workers, weight_bytes: False)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    model_dir, _ = exported("tiny")
    report_file = tmp_path / "report.json"
    assert main(["bench", str(model_dir), "--modes", "runtime,graph", "--new-tokens", "3", "--repeats", "2",
                 "--prompt-tokens", "8", "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["workload"]["interleaved"] is False
    assert [(r["mode"], r["decode_steps"]) for r in report["results"]] == [("runtime", 4), ("graph", 4)]
    assert list(temp.iterdir()) == []


def test_onnx_probes_time_every_variant():
    script = Path(__file__).resolve().parent.parent / "bench" / "onnx_probes.py"
    run = subprocess.run([sys.executable, str(script), "--rounds", "2", "--calls", "1"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "ms per" not in line]
    names = [name.strip() for name, _ in rows]
    assert {"Gemm, weight a graph input", "torch linear", "attention: ONNX Attention (opset 23)"} <= set(names)
    assert all(len(times.split(" / ")) == 2 and min(map(float, times.split(" / "))) > 0 for _, times in rows)
