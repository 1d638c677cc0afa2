"""Artifact size on disk, resident memory of a loaded runtime, and cold start, for a 2B-shaped model.

    python bench/artifact_footprint.py                    # published 2B shapes, random weights, decoder cut to 4 layers
    python bench/artifact_footprint.py --layers 2 --workdir /tmp/fp

Exports the `bench-2b` preset (11 graphs) and a one-bucket spec from the same checkpoint, then measures in fresh
processes: resident memory after loading every graph and allocating every KV cache, against weights + caches;
and cold start (process start → Runtime.load → first token of a 448x448 image + question) with 11 buckets vs 1.
Targets (issue: export + runtime): disk ≤ 1.05 × weights + 1 MB per graph; memory ≤ 1.15 × (weights + cache);
cold start with 10+ buckets ≤ 2 × with 1. Prints Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from mindvl.runtime import Runtime
from mindvl.testing.media import sample_image
rt = Runtime.load(sys.argv[1])
loaded = time.perf_counter()
if sys.argv[2] == "first-token":
    out = rt.generate("What is in this picture? Answer in one short sentence, please, and name the colours.",
                      images=[sample_image(448, 448, seed=0)], max_new_tokens=1)
    print(json.dumps({"load_s": loaded - start, "first_token_s": time.perf_counter() - start,
                      "graphs": out.buckets["vision"] + [out.buckets["prefill"]], "timings_ms": out.timings}))
else:
    m = rt.artifacts.manifest
    for g in m.graphs:
        rt.artifacts.graph(g)
    caches = {id(c): c for g in m.graphs if g.caches for c in rt.artifacts.caches(g)}  # one per (batch, cache)
    cache_bytes = sum(c.nbytes for c in caches.values())
    rss = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS"))) * 1024
    print(json.dumps({"rss_bytes": rss, "cache_bytes": cache_bytes, "graphs_loaded": len(m.graphs),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(artifacts: Path, what: str) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(artifacts), what], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def baseline_rss() -> int:
    """Resident memory of a process that imported MindSpore and the runtime but loaded nothing."""
    code = ("import mindspore, mindvl.runtime; "
            "print(int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS'))) * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 2B-shaped model")
    parser.add_argument("--workdir", default=None,
                        help="where checkpoint and artifacts go (default: a temporary folder, removed afterwards)")
    parser.add_argument("--repeats", type=int, default=3, help="cold starts measured per artifact folder")
    args = parser.parse_args()

    from mindvl.bench.benchmark import work_folder

    with work_folder(args.workdir, "mindvl-footprint-") as work:
        measure(work, args.layers, args.repeats)


def measure(work: Path, layers: int, repeats: int) -> None:
    from mindvl.shapes.manifest import Manifest
    from mindvl.testing.checkpoints import write_checkpoint

    start = time.perf_counter()
    model = write_checkpoint(work / f"2b-{layers}layers", "2b-shapes", num_hidden_layers=layers)
    print(f"checkpoint {model} ({time.perf_counter() - start:.0f} s)")
    many, one = work / "artifacts-bench-2b", work / "artifacts-one-bucket"
    (work / "one-bucket.yaml").write_text("images: [448x448]\nbatch: [1]\nprefill: [512]\ncache: [1024]\n")
    export_s = {}
    # Each export in its own process, so this one's memory never adds to what the measured children use.
    for out, spec in ((many, ["--preset", "bench-2b"]), (one, ["--buckets", str(work / "one-bucket.yaml")])):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mindvl", "export", str(model), "-o", str(out), "--force", *spec],
                       check=True)
        export_s[out] = time.perf_counter() - start

    m = Manifest.read(many)
    weights = m.files[m.weights["file"]]["bytes"]
    graph_bytes = sum(m.files[g.file]["bytes"] for g in m.graphs)
    disk = sum(f["bytes"] for f in m.files.values()) + (many / "manifest.json").stat().st_size
    disk_target = 1.05 * weights + len(m.graphs) * 2**20

    memory = child(many, "memory")
    base = baseline_rss()
    budget = weights + memory["cache_bytes"]
    cold = {out: [child(out, "first-token") for _ in range(repeats)] for out in (many, one)}
    first = {out: sorted(r["first_token_s"] for r in runs)[len(runs) // 2] for out, runs in cold.items()}

    gb = lambda n: f"{n / 2**30:.3f} GB"  # noqa: E731
    print(json.dumps({"export_s": {str(k): v for k, v in export_s.items()}, "memory": memory, "baseline_rss": base,
                      "cold": {str(k): v for k, v in cold.items()}}, indent=1))
    print(f"\n| 2B shapes, {layers} decoder layers, fp32 | {len(m.graphs)} graphs | weights {gb(weights)} | "
          f"graphs {graph_bytes / 2**20:.2f} MB | disk {gb(disk)} = {disk / weights:.4f} × weights "
          f"(target ≤ {gb(disk_target)}) | export {export_s[many]:.0f} s |")
    print(f"| memory after loading all {memory['graphs_loaded']} graphs + every cache | RSS {gb(memory['rss_bytes'])} "
          f"(MindSpore + runtime alone: {gb(base)}) | weights + caches {gb(budget)} | "
          f"RSS / (weights + caches) = {memory['rss_bytes'] / budget:.3f}, excluding the import baseline "
          f"{(memory['rss_bytes'] - base) / budget:.3f} (target ≤ 1.15) |")
    print(f"| cold start, load → first token (448x448 image + question), median of {repeats} | "
          f"{len(m.graphs)} buckets {first[many]:.2f} s | 1 bucket {first[one]:.2f} s | "
          f"ratio {first[many] / first[one]:.2f} (target ≤ 2) |")


if __name__ == "__main__":
    main()
