"""Tensor parallelism on one machine: the 2B shapes (random weights, 4 decoder layers, float32) at tp=1 and tp=2,
and on paper the per-card memory of the published 7B and 72B: the figures behind BENCHMARKS.md's "Tensor
parallelism" section.

    python bench/tensor_parallel.py --workdir /tmp/mindvl-tp-bench

(a) Each artifact in its own `mindvl bench` worker process (at tp=2 that process is the driver, and msrun runs its
    two ranks): a 448x448 image and a 32-token question, 64 new tokens, tp=1 and tp=2 taking turns; decode ms/token,
    TTFT, and the peak resident memory of the driver and of each rank. Greedy answers must be equal.
(b) What tensor parallelism adds per decode step: one all-reduce of [1, 1, hidden] float32 between the two ranks (a
    step makes two per layer), and the host channel — a decode call's wall time in the driver against its time in
    the ranks.
(c) On paper: each card's share of the weights and of the KV cache for Qwen2-VL-7B at tp=2 and 72B at tp=8 in
    bfloat16, from the same layout the export uses (shapes/parallel.py).

On 2 cores no speedup is expected: the two ranks share the cores that one process had.
"""

from __future__ import annotations

import json
import math
import time
from datetime import date
from pathlib import Path
from statistics import median

import numpy as np

from mindvl.bench.benchmark import Worker, bench_model, export_once, log, machine, question, script_args
from mindvl.shapes.config import ModelConfig, read_config
from mindvl.shapes.graphs import dtype_bytes, kv_cache_shape
from mindvl.shapes.weights import text_embed, text_weights, vision_weights

SPEC = {"images": ["448x448"], "batch": [1], "prefill": [384], "cache": [512], "dtype": "float32"}
NEW_TOKENS = 64
PAPER = (("7B", 2), ("72B", 8))
PAPER_CACHE = 32768  # one sequence at the published models' full context


def per_card(cfg: ModelConfig, tp: int, dtype: str = "bfloat16") -> dict[str, float]:
    """GB each card holds at degree `tp`: its decoder slice, the vision encoder (rank 0 only), and the KV cache of
    one sequence of PAPER_CACHE tokens; the embedding table stays on the host."""
    size = dtype_bytes(dtype)
    count = lambda weights: sum(math.prod(w.shape) for w in weights) * size / 1e9  # noqa: E731
    kv = 2 * cfg.text.num_hidden_layers * math.prod(kv_cache_shape(cfg, 1, PAPER_CACHE, tp)) * size / 1e9
    return {"decoder": count(text_weights(cfg.text, tp).weights()),
            "vision": count(vision_weights(cfg.vision).weights()), "kv_cache": kv,
            "host_embedding": count(text_embed(cfg.text))}


def greedy(artifacts: Path, prompt: str, image: str) -> list[int]:
    from mindvl.runtime import Runtime

    runtime = Runtime.load(artifacts, prefix_cache_mb=0)
    try:
        return runtime.generate(prompt, images=[image], max_new_tokens=16).token_ids
    finally:
        runtime.close()


def decode_overhead(artifacts: Path, calls: int) -> dict[str, float]:
    """(b) on a fresh tp=2 runtime: an all-reduce of one decode step's size, and a decode call's wall time in the
    driver against the time its ranks spent in the graph."""
    from mindvl.runtime import Runtime

    runtime = Runtime.load(artifacts, prefix_cache_mb=0, vision_cache_mb=0)
    try:
        graphs, hidden = runtime.artifacts.executor, runtime.config.text.hidden_size
        reduce_ms = graphs.allreduce_ms((1, 1, hidden), repeats=50)
        vision = runtime.config.vision
        patches = runtime.artifacts.manifest.find("vision", frames=1, height=448, width=448).inputs[0].shape[0]
        vision_reduce_ms = graphs.allreduce_ms((patches, vision.embed_dim), repeats=10)
        spec = runtime.artifacts.manifest.find("decode", batch=1, cache=SPEC["cache"][0])
        fed = {t.name: np.zeros(t.shape, np.float32 if t.dtype != "int32" else np.int32) for t in spec.inputs}
        runtime.artifacts.run(spec, fed)  # compiles
        before, walls = graphs.stats(), []
        for _ in range(calls):
            start = time.perf_counter()
            runtime.artifacts.run(spec, fed)
            walls.append((time.perf_counter() - start) * 1e3)
        after = graphs.stats()
        in_ranks = [(a["graph_ms"] - b["graph_ms"]) / calls for a, b in zip(after, before, strict=True)]
        return {"allreduce_ms": reduce_ms, "allreduces_per_step": 2 * runtime.config.text.num_hidden_layers,
                "vision_allreduce_ms": vision_reduce_ms, "vision_allreduce_shape": [patches, vision.embed_dim],
                "vision_allreduces": 2 * vision.depth,
                "decode_call_wall_ms": median(walls), "decode_call_in_ranks_ms": max(in_ranks), "calls": calls}
    finally:
        runtime.close()


def report_lines(report: dict) -> list[str]:
    m, runs = report["machine"], report["runs"]
    lines = [f"Command: `{report['command']}` — {report['date']}, {m['cpu']}, {m['cores']} cores, "
             f"{m['memory_gib']:.0f} GiB, MindSpore {m['mindspore']}; {report['workload']}; medians of "
             f"{report['repeats']} repeats taking turns after a warm-up.", "",
             "| tp | decode ms/token p50 | TTFT ms | vision ms | prefill ms | peak RSS GB: driver | rank 0 | rank 1 |",
             "|---|---|---|---|---|---|---|---|"]
    for tp, r in runs.items():
        steps = [s for run in r["runs"] for s in run["decode_ms"]]
        ranks = [f"{x['peak_rss_bytes'] / 2**30:.2f}" for x in r["stats"].get("ranks", [])] or ["—", "—"]
        driver = r["stats"]["peak_rss_bytes"] / 2**30
        lines.append(f"| {tp} | {np.percentile(steps, 50):.2f} | {median(x['ttft_ms'] for x in r['runs']):.0f} | "
                     f"{median(x['vision_ms'] for x in r['runs']):.0f} | "
                     f"{median(x['prefill_ms'] for x in r['runs']):.0f} | {driver:.2f} | {' | '.join(ranks)} |")
    o = report["overhead"]
    step = o["allreduce_ms"] * o["allreduces_per_step"]
    lines += ["", f"- tp=2 decode / tp=1 decode: {report['decode_ratio']:.2f}; greedy answers equal: "
                  f"{report['same_answer']}",
              f"- one all-reduce of [1, 1, {report['hidden']}] float32 between the ranks: {o['allreduce_ms']:.3f} ms; "
              f"× {o['allreduces_per_step']} per decode step = {step:.2f} ms",
              f"- a decode call: {o['decode_call_wall_ms']:.2f} ms in the driver, {o['decode_call_in_ranks_ms']:.2f} "
              f"ms in the slower rank's graph: the host channel (inputs out, logits slices back and joined) costs "
              f"{o['decode_call_wall_ms'] - o['decode_call_in_ranks_ms']:.2f} ms",
              f"- a split vision encoder would add {o['vision_allreduces']} all-reduces of "
              f"{o['vision_allreduce_shape']} per 448x448 image: {o['vision_allreduce_ms']:.2f} ms each, "
              f"{o['vision_allreduce_ms'] * o['vision_allreduces']:.0f} ms in all, against the whole encoder's "
              f"{median(x['vision_ms'] for x in runs['1']['runs']):.0f} ms at tp=1", "",
              f"On paper, bfloat16, one sequence of {PAPER_CACHE:,} cache slots (GB per card; the embedding table "
              f"stays on the driver's host):", "",
              "| model | tp | decoder slice | + vision (rank 0) | KV cache | rank 0 total | other ranks | tp=1 total |",
              "|---|---|---|---|---|---|---|---|"]
    for name, tp, card, whole in report["paper"]:
        rank0 = card["decoder"] + card["vision"] + card["kv_cache"]
        one = whole["decoder"] + whole["vision"] + whole["kv_cache"]
        lines.append(f"| {name} | {tp} | {card['decoder']:.1f} | {card['vision']:.2f} | {card['kv_cache']:.2f} | "
                     f"{rank0:.1f} | {card['decoder'] + card['kv_cache']:.1f} | {one:.1f} |")
    return lines


def main() -> None:
    args = script_args(__doc__, "/tmp/mindvl-tp-bench", 3, report_lines)

    from mindvl.testing.architectures import HUB_CONFIGS

    work = Path(args.workdir)
    model, image = bench_model(work)
    prompt = question(model, 32)
    workers, runs = {}, {}
    try:
        for tp in (1, 2):
            artifacts = export_once(model, work / f"tp{tp}-artifacts", {**SPEC, "tp": tp})
            setup = work / f"tp{tp}" / "setup.json"
            setup.parent.mkdir(exist_ok=True)
            setup.write_text(json.dumps({"artifacts": str(artifacts), "images": [image], "prompt": prompt,
                                         "new_tokens": NEW_TOKENS, "dtype": "float32"}))
            log(f"loading tp={tp} (a warm-up generation included)")
            workers[str(tp)] = Worker("runtime", setup)
            runs[str(tp)] = {"ready": workers[str(tp)].ready, "runs": []}
        for r in range(args.repeats):
            for tp in ("2", "1") if r % 2 else ("1", "2"):  # keyed as the JSON report keys them
                runs[tp]["runs"].append(workers[tp].ask("run"))
                log(f"  repeat {r + 1}/{args.repeats} tp={tp} decode {median(runs[tp]['runs'][-1]['decode_ms']):.2f}")
        for tp, worker in workers.items():
            runs[tp]["stats"] = worker.ask("stats")
    finally:
        for worker in workers.values():
            worker.close()
    answers = [greedy(work / f"tp{tp}-artifacts", prompt, image) for tp in (1, 2)]
    log("measuring the all-reduce and the host channel on a fresh tp=2 runtime")
    overhead = decode_overhead(work / "tp2-artifacts", calls=50)
    decode = {tp: median(s for run in r["runs"] for s in run["decode_ms"]) for tp, r in runs.items()}
    paper = [(name, tp, per_card(ModelConfig.from_hf(HUB_CONFIGS[name]), tp),
              per_card(ModelConfig.from_hf(HUB_CONFIGS[name]), 1)) for name, tp in PAPER]
    command = f"python bench/tensor_parallel.py --workdir {args.workdir} --repeats {args.repeats}"
    report = {"date": str(date.today()), "command": command, "repeats": args.repeats, "machine": machine(),
              "workload": f"2B shapes with 4 decoder layers, float32, buckets {SPEC}, a 448x448 image and a "
                          f"32-token question, {NEW_TOKENS} new tokens",
              "hidden": read_config(model).text.hidden_size, "runs": runs, "decode_ratio": decode["2"] / decode["1"],
              "same_answer": answers[0] == answers[1],
              "overhead": overhead, "paper": paper}
    out = Path(__file__).parent / "results" / "scripts" / "tensor_parallel.json"
    out.write_text(json.dumps(report, indent=1))
    print("\n".join(report_lines(report)))


if __name__ == "__main__":
    main()
