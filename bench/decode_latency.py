"""Per-token decode latency, graph mode vs pynative, on one model; prints a Markdown row for BENCHMARKS.md.

    python bench/decode_latency.py                     # the tiny random model the demo uses
    python bench/decode_latency.py --model DIR --new-tokens 32 --repeats 5

Warm-up first (graph compilation is reported on its own line), then `--repeats` generations per mode,
interleaved so both modes see the same machine state; the figures are medians and p90 over all decode steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date

import numpy as np

os.environ.setdefault("GLOG_v", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF Qwen2-VL folder (default: the tiny random model)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import mindspore as ms

    from mindvl.fixtures import write_checkpoint
    from mindvl.qwen2vl import load
    from mindvl.samples import sample_image
    from mindvl.shapes.processor import Processor

    model_dir = args.model or write_checkpoint(tempfile.mkdtemp(prefix="mindvl-bench-") + "/tiny", "tiny")
    model = load(model_dir, dtype=args.dtype)
    inputs = Processor(model_dir)("Describe this image.", images=[sample_image(224, 224, seed=0)])
    del inputs["attention_mask"]

    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=args.new_tokens, mode="graph")
    print(f"graph warm-up (compiles prefill and decode): {time.perf_counter() - start:.2f} s")
    model.generate(**inputs, max_new_tokens=2, mode="pynative")

    steps: dict[str, list[float]] = {"graph": [], "pynative": []}
    for _ in range(args.repeats):
        for mode in steps:
            steps[mode] += model.generate(**inputs, max_new_tokens=args.new_tokens, mode=mode).decode_ms
    stats = {mode: (float(np.median(v)), float(np.percentile(v, 90))) for mode, v in steps.items()}
    for mode, (p50, p90) in stats.items():
        print(f"{mode:<9} decode median {p50:8.2f} ms/token   p90 {p90:8.2f}   ({len(steps[mode])} steps)")
    speedup = stats["pynative"][0] / stats["graph"][0]
    print(f"\n| {date.today()} | {model.cfg.text.num_hidden_layers}-layer {model.cfg.text.hidden_size}-wide "
          f"{'tiny' if args.model is None else 'model'} | {args.dtype} | {inputs['input_ids'].shape[1]} | "
          f"{stats['graph'][0]:.2f} / {stats['graph'][1]:.2f} | {stats['pynative'][0]:.1f} / {stats['pynative'][1]:.1f} | "
          f"{speedup:.0f}× | MindSpore {ms.__version__}, {platform.machine()}, {os.cpu_count()} cores |")


if __name__ == "__main__":
    main()
