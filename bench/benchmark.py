"""`mindvl bench`: runtime (exported MindIR), graph (cells under jit), pynative and transformers, side by side.

Each mode runs in its own worker process (`mindvl.bench.worker`), loaded once; the workers are then asked for
one generation each in turn, `repeats` times, so every ratio comes from one run on one machine (when the
workers' weights cannot all stay in memory at once, the modes run one after another instead). Alongside:
the machine's memory read bandwidth (numpy, both cores) and the decode roofline, the bytes one decode step
must read (decoder weights + the KV cache filled so far) divided by that bandwidth.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from statistics import median
from typing import Any, Callable, Iterator

import numpy as np

from mindvl.errors import MindVLError
from mindvl.plotting import pyplot
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.config import ModelConfig, read_config
from mindvl.shapes.image import ProcessorConfig, smart_resize
from mindvl.shapes.manifest import MANIFEST, Manifest
from mindvl.shapes.processor import Processor
from mindvl.shapes.prompt import Tokenizer

MODES = ("runtime", "onnx", "graph", "pynative", "transformers")  # runtime: MindIR graphs; onnx: the same, as ONNX
EXPORTED = ("runtime", "onnx")  # the modes that run an artifact
FILLER = "Please describe the picture in careful detail, naming every object, colour, shape and texture you see there. "
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second that summing a large array reads, split over every core (best of `repeats`)."""
    data = np.ones(int(gigabytes * 2**30 / 4), np.float32)
    parts = np.array_split(data, os.cpu_count() or 1)
    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=np.sum, args=(p,)) for p in parts]  # np.sum releases the GIL
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def decode_bytes(cfg: ModelConfig, dtype: str, filled: int) -> int:
    """What one decode step must read: every decoder weight, the LM head, and the keys/values of `filled` slots."""
    t = cfg.text
    attn = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim + t.hidden_size**2
    layer = attn + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
    weights = t.num_hidden_layers * layer + t.vocab_size * t.hidden_size + t.hidden_size
    cache = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * filled
    return (weights + cache) * ITEMSIZE[dtype]


def export_once(model: Path, out: Path, spec: dict) -> Path:
    """`mindvl export` at `spec` (a dict as in YAML), unless `out` already holds that export."""
    if (out / MANIFEST).is_file() and Manifest.read(out).buckets == BucketSpec.from_dict(spec).to_dict():
        return out
    (out.parent / f"{out.name}.yaml").write_text(json.dumps(spec))
    log(f"exporting {model} → {out} ({spec})")
    subprocess.run([sys.executable, "-m", "mindvl", "export", str(model), "-o", str(out), "--buckets",
                    str(out.parent / f"{out.name}.yaml"), "--force"], check=True, stderr=subprocess.DEVNULL)
    return out


@contextmanager
def work_folder(workdir: str | Path | None, prefix: str) -> Iterator[Path]:
    """`workdir` when the user names one (kept, so a later run can reuse its exports); else a temporary folder,
    removed afterwards: a 2B-shaped export is gigabytes, and nobody looks for it under /tmp."""
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def script_args(doc: str, workdir: str, repeats: int, report_lines: Callable[[dict], list[str]]) -> argparse.Namespace:
    """The options of every script behind BENCHMARKS.md: --workdir, --repeats, and --report, which prints the
    figures (`report_lines`) of a report the script wrote and exits."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--report", type=Path, help="print the figures of a report this script wrote, and exit")
    args = parser.parse_args()
    if args.report:
        print("\n".join(report_lines(json.loads(args.report.read_text()))))
        sys.exit(0)
    return args


def bench_model(work: Path) -> tuple[Path, str]:
    """The 2B shapes with 4 decoder layers (random weights) and the 448x448 sample image, made once in `work`."""
    from mindvl.testing.checkpoints import write_checkpoint
    from mindvl.testing.media import sample_image

    work.mkdir(parents=True, exist_ok=True)
    model = write_checkpoint(work / "models" / "2b-4layers", "2b-shapes", num_hidden_layers=4)
    image = work / "bench-448x448.png"
    sample_image(448, 448, seed=0).save(image)
    return model, str(image)


def question(model_dir: Path, tokens: int) -> str:
    """A question of about `tokens` tokens for this model's tokenizer."""
    tokenizer = Tokenizer.from_dir(model_dir)
    words, text = FILLER.split(), ""
    while len(tokenizer.encode(text)) < tokens:
        text += words[len(text.split()) % len(words)] + " "
    return text.strip()


def _auto_spec(model_dir: Path, image: str, prompt: str, new_tokens: int, dtype: str) -> BucketSpec:
    """The smallest spec serving this workload: the image's own bucket, a prefill of the prompt
    rounded up to a multiple of 64 (as a bucket ladder would serve it), a cache for it."""
    from PIL import Image

    proc = ProcessorConfig.from_dir(model_dir)
    with Image.open(image) as im:
        h, w = smart_resize(im.height, im.width, proc.factor, proc.min_pixels, proc.max_pixels)
    probe = BucketSpec.from_dict({"images": [f"{h}x{w}"], "batch": [1], "prefill": [1 << 20], "cache": [1 << 20]})
    length = Processor(model_dir, probe).prepare(prompt, images=[image]).input_ids.shape[1]
    prefill = -(-length // 64) * 64
    cache = -(-(prefill + new_tokens) // 128) * 128
    return BucketSpec.from_dict({"images": [f"{h}x{w}"], "batch": [1], "prefill": [prefill], "cache": [cache],
                                 "dtype": dtype})


class Worker:
    def __init__(self, mode: str, setup_file: Path) -> None:
        self.mode = mode
        # Its log goes to a file: a pipe read only on failure would fill up and stall a chatty worker.
        self.log = setup_file.parent / f"{mode}.log"
        with self.log.open("w") as log_file:
            self.proc = subprocess.Popen([sys.executable, "-m", "mindvl.bench.worker", mode, str(setup_file)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                         env={**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")})
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            tail = " ".join(self.log.read_text(errors="replace").strip().splitlines()[-1:])
            raise MindVLError(f"bench mode {self.mode} failed: {tail or 'its worker exited'}; rerun with only the "
                              f"other modes (--modes) or fix the cause")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleave(workers: int, weight_bytes: int) -> bool:
    """Whether every mode's worker can stay loaded at once, taking turns: their weights together within three
    quarters of the machine's memory (measured on the 2B shapes: a worker peaks at 1.2–2.3 × its weights, and
    the workers do not peak at the same time)."""
    return workers * weight_bytes <= 0.75 * _memory_gib() * 2**30


def _measure(modes: tuple[str, ...], setup_file: Path, repeats: int, ready: dict, runs: dict, stats: dict) -> None:
    """Load one worker per mode, then ask them for a generation each in turn, `repeats` times."""
    workers = {}
    try:
        for mode in modes:
            log(f"loading {mode} (cold start: process start → first token, then a warm-up generation)")
            workers[mode] = Worker(mode, setup_file)
            ready[mode] = workers[mode].ready
            log(f"  {mode}: cold start {ready[mode]['cold_start_s']:.2f} s")
            runs[mode] = []
        for r in range(repeats):
            for mode in modes:
                runs[mode].append(workers[mode].ask("run"))
                log(f"  repeat {r + 1}/{repeats} {mode:<12} decode {median(runs[mode][-1]['decode_ms']):8.2f} ms/token")
        stats.update({m: w.ask("stats") for m, w in workers.items()})
    finally:
        for w in workers.values():
            w.close()


def _summary(mode: str, ready: dict, runs: list[dict], stats: dict, roofline_ms: float,
             extra: dict[str, Any]) -> dict[str, Any]:
    steps = [s for r in runs for s in r["decode_ms"]]
    p50 = float(np.percentile(steps, 50)) if steps else float("nan")
    return {
        "mode": mode, **extra,
        "load_s": ready["load_s"], "cold_start_s": ready["cold_start_s"], "warmup_s": ready["warmup_s"],
        "vision_ms": median(r["vision_ms"] for r in runs), "prefill_ms": median(r["prefill_ms"] for r in runs),
        "ttft_ms": median(r["ttft_ms"] for r in runs), "decode_ms_p50": p50,
        "decode_ms_p90": float(np.percentile(steps, 90)) if steps else float("nan"),
        "tokens_per_s": 1e3 / p50, "peak_rss_bytes": stats["peak_rss_bytes"], "decode_vs_roofline": p50 / roofline_ms,
        "decode_steps": len(steps),
    }


def run_bench(target: str | Path, modes: tuple[str, ...] = MODES, image: str | None = None, prompt_tokens: int = 32,
              new_tokens: int = 64, buckets: BucketSpec | None = None, repeats: int = 3, dtype: str = "float32",
              model: str | Path | None = None, workdir: str | Path | None = None,
              device: str | None = None) -> dict[str, Any]:
    """Measure every mode on one workload; returns the report `--json` writes."""
    from mindvl.testing.media import sample_image

    target = Path(target)
    is_artifacts = (target / MANIFEST).is_file()
    model_dir = Path(model) if model else (None if is_artifacts else target)
    if model_dir is None and set(modes) - set(EXPORTED):
        raise MindVLError(f"{target} is an artifact folder: modes {sorted(set(modes) - set(EXPORTED))} need the model "
                          f"it was exported from; pass --model MODEL_DIR or --modes runtime,onnx")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise MindVLError(f"unknown bench modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    for mode, package, extra in (("transformers", "transformers", "test"), ("onnx", "onnxruntime", "onnx")):
        if mode in modes and importlib.util.find_spec(package) is None:
            log(f"{package} is not installed: skipping the {mode} mode (pip install 'mindvl[{extra}]')")
            modes = tuple(m for m in modes if m != mode)
    with work_folder(workdir, "mindvl-bench-") as work:
        tokenizer_dir = target / "tokenizer" if is_artifacts else model_dir
        if image is None:
            image = str(work / "bench-448x448.png")
            sample_image(448, 448, seed=0).save(image)
        prompt = question(tokenizer_dir, prompt_tokens)

        export_s = None
        if is_artifacts:
            manifest = Manifest.read(target)
            artifacts, cfg, spec = target, manifest.config, BucketSpec.from_dict(manifest.buckets)
        else:
            artifacts, cfg = work / "artifacts", read_config(model_dir)
            spec = buckets or _auto_spec(model_dir, image, prompt, new_tokens, dtype)
        formats = [f for mode, f in (("runtime", "mindir"), ("onnx", "onnx")) if mode in modes]
        if not is_artifacts and formats:
            (work / "buckets.yaml").write_text(json.dumps(spec.to_dict()))
            log(f"exporting {model_dir} → {artifacts} (buckets: {spec.to_dict()}, formats {formats})")
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mindvl", "export", str(model_dir), "-o", str(artifacts),
                            "--buckets", str(work / "buckets.yaml"), "--dtype", dtype, "--force", "--format",
                            ",".join(formats)], check=True, stderr=subprocess.DEVNULL)
            export_s = time.perf_counter() - start
        setup = {"artifacts": str(artifacts), "model": str(model_dir) if model_dir else None, "images": [image],
                 "prompt": prompt, "new_tokens": new_tokens, "dtype": dtype, "buckets": spec.to_dict(),
                 "device": device}
        (work / "setup.json").write_text(json.dumps(setup))

        exported = is_artifacts or bool(formats)  # else work/artifacts may be an earlier run's
        weight_bytes = (artifacts / "weights.safetensors").stat().st_size if exported else sum(
            f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        together = interleave(len(modes), weight_bytes)
        if not together:
            log(f"{len(modes)} workers holding {weight_bytes / 1e9:.1f} GB of weights each do not fit in memory "
                f"together: measuring the modes one after another instead of interleaved")
        ready, runs, stats = {}, {}, {}
        for group in [modes] if together else [(m,) for m in modes]:
            _measure(group, work / "setup.json", repeats, ready, runs, stats)

        log("measuring memory read bandwidth")
        bandwidth = read_bandwidth()
        prompt_len = Processor(tokenizer_dir, spec).prepare(prompt, images=[image]).input_ids.shape[1]
        step_bytes = decode_bytes(cfg, dtype, prompt_len + new_tokens // 2)
        roofline_ms = step_bytes / bandwidth * 1e3
        results = [_summary(m, ready[m], runs[m], stats[m], roofline_ms,
                            {"export_s": export_s} if m in EXPORTED else {}) for m in modes]
        return {
            "date": str(date.today()),
            "machine": machine(),
            "model": {"layers": cfg.text.num_hidden_layers, "hidden_size": cfg.text.hidden_size,
                      "vocab_size": cfg.text.vocab_size, "vision_depth": cfg.vision.depth, "dtype": dtype},
            "workload": {"image": Path(image).name, "image_bucket": spec.to_dict().get("images"),
                         "prompt_tokens": prompt_len, "question_tokens": prompt_tokens, "new_tokens": new_tokens,
                         "repeats": repeats, "interleaved": together, "prefill": spec.prefill, "cache": spec.cache},
            "bandwidth_gb_s": bandwidth / 1e9, "decode_step_bytes": step_bytes, "roofline_decode_ms": roofline_ms,
            "results": results,
        }


def machine() -> dict[str, Any]:
    """What a figure was measured on: every report names its CPU, as a claim holds only where measured."""
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "memory_gib": _memory_gib(), "platform": platform.platform(),
            "mindspore": _version("mindspore"), "torch": _version("torch")}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def format_table(report: dict[str, Any]) -> str:
    rows = [f"roofline: {report['decode_step_bytes'] / 2**20:,.1f} MB per decode step / "
            f"{report['bandwidth_gb_s']:.1f} GB/s = {report['roofline_decode_ms']:.2f} ms/token",
            f"{'mode':<13}{'export/warm-up s':>17}{'cold start s':>13}{'vision ms':>11}{'prefill ms':>11}"
            f"{'TTFT ms':>10}{'decode p50':>11}{'p90':>9}{'tok/s':>8}{'peak RSS GB':>12}{'× roofline':>11}"]
    for r in report["results"]:
        setup_s = r.get("export_s") or r["warmup_s"]
        rows.append(f"{r['mode']:<13}{setup_s:>17.2f}{r['cold_start_s']:>13.2f}{r['vision_ms']:>11.1f}"
                    f"{r['prefill_ms']:>11.1f}{r['ttft_ms']:>10.1f}{r['decode_ms_p50']:>11.2f}{r['decode_ms_p90']:>9.2f}"
                    f"{r['tokens_per_s']:>8.1f}{r['peak_rss_bytes'] / 2**30:>12.2f}{r['decode_vs_roofline']:>11.2f}")
    return "\n".join(rows)


def plot(report: dict[str, Any], path: str | Path) -> None:
    plt = pyplot()
    results = report["results"]
    modes = [r["mode"] for r in results]
    fig, (stages, decode) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(modes))
    for i, (key, label) in enumerate((("vision_ms", "vision"), ("prefill_ms", "prefill"), ("ttft_ms", "TTFT"))):
        stages.bar(x + (i - 1) * 0.27, [r[key] for r in results], 0.27, label=label)
    stages.set_xticks(x, modes)
    stages.set_yscale("log")
    stages.set_ylabel("ms (log scale)")
    stages.set_title("per-stage latency by mode")
    stages.legend()
    decode.bar(x, [r["decode_ms_p50"] for r in results], 0.6, label="decode p50")
    decode.axhline(report["roofline_decode_ms"], color="black", linestyle="--", label="memory roofline")
    decode.set_xticks(x, modes)
    decode.set_yscale("log")
    decode.set_ylabel("ms per token (log scale)")
    decode.set_title("decode vs the memory roofline")
    decode.legend()
    m = report["model"]
    fig.suptitle(f"{m['layers']}-layer Qwen2-VL (hidden {m['hidden_size']}), {m['dtype']}, "
                 f"{report['workload']['prompt_tokens']} prompt tokens, {report['workload']['new_tokens']} new")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
