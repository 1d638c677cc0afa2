"""`mindvl plan` on a workload of realistic sizes, against the default preset with the same number of graphs: the
figures behind BENCHMARKS.md's "Planned buckets" section.

    python bench/plan_workload.py --workdir /tmp/mindvl-plan-bench

The model is Qwen2-VL-2B's published shapes (config, tokenizer, preprocessor; no weights: the planner reads none),
with max_pixels = 1280 x 28 x 28 = 1,003,520 (1,280 tokens), the upper end of the range Qwen2-VL's model card
recommends: with the hub file's 12,845,056 a phone photo is 15,552 tokens natively. The workload is 400 requests
drawn with a fixed seed, written as `mindvl serve --log-shapes` lines (sizes only):

    30 % camera photos: 4032x3024 and 4000x3000 landscape (4:3), 3024x4032 portrait (3:4), 1600x1200 uploads
    25 % phone screenshots (9:16 and taller): 1080x2340, 1170x2532, 1080x1920, 1284x2778
    20 % A4 document pages: 1240x1754 (150 dpi) and 2480x3508 (300 dpi), portrait
    10 % small icons: 32, 48, 64, 128 px square
    10 % 16:9 videos: 1920x1080 and 1280x720 at 30 fps, 5 to 30 s
     5 % text only
    text tokens 30 to 600 (a question and the chat template), max_tokens 128, 256 or 512.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mindvl.plan.command import run_plan
from mindvl.plan.planner import graph_count
from mindvl.plan.report import format_report, plot_report
from mindvl.shapes.buckets import BucketSpec
from mindvl.testing.checkpoints import write_model_files

KINDS = (  # (share, kind, sizes as (height, width))
    (0.30, "photo", [(3024, 4032), (3000, 4000), (4032, 3024), (1200, 1600)]),
    (0.25, "screenshot", [(2340, 1080), (2532, 1170), (1920, 1080), (2778, 1284)]),
    (0.20, "document", [(1754, 1240), (3508, 2480)]),
    (0.10, "icon", [(32, 32), (48, 48), (64, 64), (128, 128)]),
    (0.10, "video", [(1080, 1920), (720, 1280)]),
    (0.05, "text", [None]),
)


def workload(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        _, kind, sizes = rng.choices(KINDS, weights=[k[0] for k in KINDS])[0]
        size = rng.choice(sizes)
        line = {"images": [], "videos": [], "text_tokens": rng.randint(30, 600),
                "max_tokens": rng.choice((128, 256, 512))}
        if kind == "video":
            line["videos"] = [{"frames": 30 * rng.randint(5, 30), "height": size[0], "width": size[1], "fps": 30}]
        elif size is not None:
            line["images"] = [list(size)]
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/mindvl-plan-bench")
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    work = Path(args.workdir)
    model = write_model_files(work / "qwen2-vl-2b-files", "2b-shapes", max_pixels=1280 * 28 * 28)
    sample = work / "workload.jsonl"
    sample.write_text("".join(json.dumps(line) + "\n" for line in workload(args.requests)))
    graphs = graph_count(BucketSpec.preset("default"))
    report = run_plan(model, sample, work / "planned.yaml", max_graphs=graphs, against="default")
    (work / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(report, work / "report.png")
    print(format_report(report))
    planned, default = (report["plans"][k]["per_request"] for k in ("planned", "against"))
    fewer = 1 - planned["waste_tokens"] / default["waste_tokens"]
    print(f"\nwasted vision tokens per request: planned {planned['waste_tokens']:.1f}, default "
          f"{default['waste_tokens']:.1f}: {fewer:.0%} fewer (target >= 30 %); inputs below the floor: planned "
          f"{report['plans']['planned']['below_floor']:.1%}, default {report['plans']['against']['below_floor']:.1%}")
    print((work / "planned.yaml").read_text())


if __name__ == "__main__":
    main()
