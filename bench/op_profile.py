"""Where one exported graph spends its time, op by op, from MindSpore's own profiler.

    python bench/op_profile.py ARTIFACTS                         # lists the graphs
    python bench/op_profile.py ARTIFACTS --graph decode_b1_c512 --runs 5
    python bench/op_profile.py ARTIFACTS --graph vision_448x448 --runs 3 --format onnx   # onnxruntime's profiler

Feeds the graph synthetic inputs of its declared shapes (floats random, integers zero: valid positions, slots
and indices), runs it once to load it and touch its memory, times `--runs` plain runs, then profiles `--runs`
more under `mindspore.profiler.profile` and prints Markdown: per op type, calls and milliseconds per run and
share of the op total; then the slowest single ops. BENCHMARKS.md's per-op evidence comes from this script.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_v", "3")


def synthetic_inputs(spec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {t.name: (np.zeros(t.shape, np.int32) if t.dtype == "int32"
                     else (rng.standard_normal(t.shape) * 0.1).astype(np.float32)) for t in spec.inputs}


def read_rows(folder: Path, pattern: str) -> list[dict[str, str]]:
    files = sorted(folder.rglob(pattern))
    if not files:
        sys.exit(f"the profiler wrote no {pattern} under {folder}; this script reads MindSpore 2.x's CPU op tables")
    with files[0].open(newline="") as f:
        return list(csv.DictReader(f))


def input_shapes(folder: Path) -> dict[str, str]:
    """Op name → its input shapes, from the profiler's framework log (`type;name;id;input_1:[..];...`)."""
    shapes = {}
    for path in folder.rglob("cpu_framework_*.txt"):
        for line in path.read_text().splitlines():
            fields = line.split(";")
            if len(fields) > 3:
                shapes[fields[1]] = " × ".join(f.split(":", 1)[1] for f in fields[3:] if ":[" in f)
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--graph", help="graph name from the manifest (omit to list them)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=10, help="how many single ops to list")
    ap.add_argument("--format", choices=("mindir", "onnx"), default="mindir",
                    help="profile the graph's MindIR (MindSpore's profiler) or ONNX file (onnxruntime's)")
    args = ap.parse_args()
    if args.format == "onnx":
        onnx_profile(args)
        return

    import mindspore as ms
    from mindspore.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    from mindvl.runtime.artifacts import Artifacts
    from mindvl.shapes.manifest import Manifest

    manifest = Manifest.read(args.artifacts)
    names = [g.name for g in manifest.graphs]
    if args.graph not in names:
        sys.exit(f"--graph must name one of this folder's graphs: {', '.join(names)}")
    spec = manifest.graph(args.graph)
    artifacts = Artifacts(args.artifacts, verify=False)
    inputs = synthetic_inputs(spec)
    artifacts.run(spec, inputs)

    wall = []
    for _ in range(args.runs):
        start = time.perf_counter()
        artifacts.run(spec, inputs)
        wall.append((time.perf_counter() - start) * 1e3)

    with tempfile.TemporaryDirectory(prefix="mindvl-op-profile-") as out:
        with profile(activities=[ProfilerActivity.CPU], on_trace_ready=tensorboard_trace_handler(out)) as prof:
            for _ in range(args.runs):
                artifacts.run(spec, inputs)
                prof.step()
        types = read_rows(Path(out), "cpu_op_type_info_*.csv")
        ops = read_rows(Path(out), "cpu_op_detail_info_*.csv")
        shapes = input_shapes(Path(out))

    runs = args.runs
    total = sum(float(r["total_compute_time"]) for r in types) / runs
    print(f"{spec.name}, MindSpore {ms.__version__}: wall {statistics.median(wall):.1f} ms per run (median of {runs}), "
          f"ops {total:.1f} ms per run (profiled, {runs} runs)\n")
    print("| op type | calls per run | ms per run | share |\n|---|---|---|---|")
    for r in sorted(types, key=lambda r: -float(r["total_compute_time"])):
        ms_run = float(r["total_compute_time"]) / runs
        print(f"| {r['op_type']} | {int(r['type_occurrences']) // runs} | {ms_run:.2f} | {ms_run / total:.1%} |")
    print("\n| slowest ops | inputs | ms per call | share |\n|---|---|---|---|")
    for r in sorted(ops, key=lambda r: -float(r["op_avg_time(ms)"]))[:args.top]:
        calls = int(r["op_occurrences"]) // runs
        share = float(r["op_total_time(ms)"]) / runs / total
        print(f"| {r['op_name']} ({calls} per run) | {shapes.get(r['op_name'], '')} | "
              f"{float(r['op_avg_time(ms)']):.2f} | {share:.1%} |")


def onnx_profile(args: argparse.Namespace) -> None:
    """The op-type table of one ONNX graph, from onnxruntime's own profiler (per node kernel times)."""
    import json
    from collections import Counter

    import onnxruntime as ort

    from mindvl.runtime.artifacts import Artifacts

    artifacts = Artifacts(args.artifacts, verify=False, fmt="onnx")
    spec = artifacts.manifest.graph(args.graph)
    options = ort.SessionOptions()
    options.enable_profiling, options.log_severity_level = True, 3
    with tempfile.TemporaryDirectory(prefix="mindvl-ort-profile-") as out:
        options.profile_file_prefix = str(Path(out) / "ort")
        session = ort.InferenceSession(str(args.artifacts / spec.file), options, providers=["CPUExecutionProvider"])
        artifacts.executor._sessions[spec.name] = session  # the runtime's own binding, through a profiled session
        inputs = synthetic_inputs(spec)
        artifacts.run(spec, inputs)  # the warm-up's events are dropped below: only the last `runs` calls count
        wall = []
        for _ in range(args.runs):
            start = time.perf_counter()
            artifacts.run(spec, inputs)
            wall.append((time.perf_counter() - start) * 1e3)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_call = len(nodes) // (args.runs + 1)
    nodes = nodes[per_call:]
    ms, calls = Counter(), Counter()
    for e in nodes:
        ms[e["args"]["op_name"]] += e["dur"] / 1e3 / args.runs
        calls[e["args"]["op_name"]] += 1
    total = sum(ms.values())
    print(f"{spec.name}, onnxruntime {ort.__version__}: wall {statistics.median(wall):.1f} ms per run (median of "
          f"{args.runs}), ops {total:.1f} ms per run (profiled)\n")
    print("| op type | calls per run | ms per run | share |\n|---|---|---|---|")
    for op, value in ms.most_common():
        print(f"| {op} | {calls[op] // args.runs} | {value:.2f} | {value / total:.1%} |")


if __name__ == "__main__":
    main()
