"""Run every `mindvl bench` workload and refresh the generated section of BENCHMARKS.md.

    python bench/run_all.py                 # tiny model + 2B shapes with 4 decoder layers
    python bench/run_all.py --layers 28     # the 2B workload at its full depth (~9 GB fp32) instead of 4 layers

Workloads: the tiny random model; the published Qwen2-VL-2B shapes with random weights, decoder cut to
`--layers`, one 448x448 image and a 32-token question, 64 new tokens. JSON reports and plots go to
bench/results/ (other scripts' reports go to bench/results/scripts/); the generated section shows every report stored
there (a `--layers 28` run adds its table beside
the 4-layer one), with the targets recomputed from them each time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench/run_all.py: begin -->", "<!-- bench/run_all.py: end -->"


def options(name: str) -> list[str]:
    """`mindvl bench` options of one workload, by its report's name ("tiny" or "2b-{layers}layers")."""
    extra = [] if name == "tiny" else ["--prompt-tokens", "32", "--new-tokens", "64"]
    if name == "2b-28layers":  # pynative and graph mode take most of an hour at full depth: the executors only
        extra += ["--modes", "runtime,onnx,transformers"]
    return ["--json", f"bench/results/{name}.json", "--plot", f"bench/results/{name}.png", *extra]


def bench(name: str, model: Path, work: Path) -> None:
    print(f"$ mindvl bench {model} {' '.join(options(name))}", flush=True)
    subprocess.run([sys.executable, "-m", "mindvl", "bench", str(model), *options(name), "--workdir",
                    str(work / name)], check=True, cwd=ROOT)


def table(report: dict) -> list[str]:
    rows = ["| mode | export / warm-up s | cold start s | vision ms | prefill ms | TTFT ms | decode ms/token p50 / p90 "
            "| tokens/s | peak RSS GB | × roofline |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        setup = r.get("export_s") or r["warmup_s"]
        rows.append(f"| {r['mode']} | {setup:.1f} | {r['cold_start_s']:.2f} | {r['vision_ms']:.1f} | "
                    f"{r['prefill_ms']:.1f} | {r['ttft_ms']:.1f} | "
                    f"{r['decode_ms_p50']:.2f} / {r['decode_ms_p90']:.2f} | "
                    f"{r['tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['decode_vs_roofline']:.2f} |")
    return rows


def targets(report: dict, big: bool) -> list[str]:
    by = {r["mode"]: r for r in report["results"]}
    rt = by["runtime"]
    checks = []

    def check(label: str, value: float, limit: float, below: bool = True) -> None:
        ok = value <= limit if below else value >= limit
        checks.append(f"- {label}: {value:.2f} ({'≤' if below else '≥'} {limit}) — **{'met' if ok else 'missed'}**")

    if big:
        executors = [m for m in ("runtime", "onnx") if m in by]
        for mode in executors:
            check(f"{mode} decode / roofline", by[mode]["decode_vs_roofline"], 1.3)
        if "transformers" in by:
            hf = by["transformers"]
            for mode in executors:
                check(f"{mode} decode / transformers decode", by[mode]["decode_ms_p50"] / hf["decode_ms_p50"], 1.0)
                check(f"{mode} TTFT / transformers TTFT", by[mode]["ttft_ms"] / hf["ttft_ms"], 1.0)
            for key, label in (("decode_ms_p50", "decode"), ("ttft_ms", "TTFT")):
                best = min(executors, key=lambda m: by[m][key])  # noqa: B023 (used at once)
                check(f"the better executor on {label} ({best}) / transformers", by[best][key] / hf[key], 1.0)
    if "pynative" in by:
        check("pynative decode / runtime decode", by["pynative"]["decode_ms_p50"] / rt["decode_ms_p50"],
              3 if big else 10, below=False)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/mindvl-bench")
    args = parser.parse_args()

    from mindvl.testing.checkpoints import write_checkpoint

    work = Path(args.workdir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tiny = write_checkpoint(work / "models" / "tiny", "tiny")
    two_b = write_checkpoint(work / "models" / f"2b-{args.layers}layers", "2b-shapes", num_hidden_layers=args.layers)
    bench("tiny", tiny, work)
    bench(f"2b-{args.layers}layers", two_b, work)
    refresh()


def refresh() -> None:
    """Rewrite BENCHMARKS.md's generated section from every report in bench/results/."""
    stored = (json.loads(path.read_text()) | {"name": path.stem} for path in RESULTS.glob("*.json"))
    reports = sorted(stored, key=lambda r: (r["model"]["hidden_size"], r["model"]["layers"]))
    lines = [BEGIN, ""]
    for report in reports:
        name = report["name"]
        m, w = report["machine"], report["workload"]
        order = "interleaved repeats" if w["interleaved"] else "repeats, one mode after another"
        command = f"mindvl bench MODEL_DIR {' '.join(options(name))}"
        lines += [f"### {name}: {report['model']['layers']} decoder layers, hidden {report['model']['hidden_size']}, "
                  f"{report['model']['dtype']}", "",
                  f"Command: `{command}` — {report['date']}, {m['cpu']}, {m['cores']} cores, "
                  f"{m['memory_gib']:.0f} GiB, MindSpore {m['mindspore']}, torch {m['torch']}.",
                  f"Workload: {w['image']} in bucket {w['image_bucket']}, {w['prompt_tokens']} prompt tokens "
                  f"({w['question_tokens']}-token question), {w['new_tokens']} new tokens, {w['repeats']} {order}. "
                  f"Roofline: {report['decode_step_bytes'] / 2**20:,.1f} MB per decode step at "
                  f"{report['bandwidth_gb_s']:.1f} GB/s = {report['roofline_decode_ms']:.2f} ms/token.", "",
                  *table(report), "", *targets(report, big=name != "tiny"), "",
                  f"![{name}](bench/results/{name}.png)", ""]
    lines.append(END)
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    section = "\n".join(lines)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(END):]
    else:
        text = text + "\n" + section + "\n"
    path.write_text(text)
    print(f"refreshed {path}")


if __name__ == "__main__":
    main()
