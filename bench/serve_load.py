"""Load on `mindvl serve`: N chat completions from C concurrent streaming clients; latency percentiles and
throughput, printed with a Markdown row for BENCHMARKS.md.

    python bench/serve_load.py                              # tiny random model, exported at batch [1, 4]
    python bench/serve_load.py --batch 1 --requests 200 --concurrency 32
    python bench/serve_load.py --artifacts DIR              # artifacts you exported

The server is `mindvl serve` in a child process on a free loopback port. Warm-up first (one request of each kind:
graphs load and compile on first use; reported on its own line), then the measured run. Latency is from sending a
request to its last byte, TTFT to its first generated text, both at the client; every request is greedy and its
answer is checked against the warm-up answer of its kind.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
import numpy as np

SPEC = "images: [112x112, 224x224, 168x224, 224x168]\nbatch: [{batch}]\nprefill: [64, 128, 256]\ncache: [256, 512]\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", help="an artifact folder (default: the tiny random model, exported here)")
    parser.add_argument("--batch", default="1,4", help="batch buckets of that export (default: 1,4)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mindvl-serve-load-"))
    artifacts = Path(args.artifacts) if args.artifacts else export_tiny(work, args.batch)
    kinds = workload(args.max_tokens)
    port = free_port()
    with open(work / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "mindvl", "serve", str(artifacts), "--port", str(port),
                                   "--max-concurrency", str(max(64, args.concurrency))], stdout=log, stderr=log,
                                  env={**os.environ, "GLOG_v": "3"})
    url = f"http://127.0.0.1:{port}"
    try:
        model = wait_until_healthy(url, server, work / "serve.log")
        start = time.perf_counter()
        answers = [complete(url, model, body)["text"] for body in kinds]
        print(f"warm-up (loads and compiles the graphs, one request per kind): {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as clients:
            results = list(clients.map(lambda k: attempt(url, model, kinds[k % len(kinds)]), range(args.requests)))
        wall = time.perf_counter() - start
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)

    failed = [r["error"] for r in results if "error" in r]
    wrong = sum(r["text"] != answers[k % len(kinds)] for k, r in enumerate(results) if "error" not in r)
    results = [r for r in results if "error" not in r]
    latency = np.array([r["latency"] for r in results]) * 1e3
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    tokens = sum(r["tokens"] for r in results)
    steps, rows = (series(metrics, f"mindvl_decode_{name}_total") for name in ("steps", "rows"))
    batch = json.loads((artifacts / "manifest.json").read_text())["buckets"]
    print(f"{args.requests} requests, {args.concurrency} clients, {args.max_tokens} max tokens: {wall:.1f} s, "
          f"{len(failed)} failed {failed[:3]}, {wrong} answers differing from their warm-up answer, mean batch use "
          f"{rows / max(steps, 1):.2f} rows")
    print(f"latency p50 {np.median(latency):.0f} ms  p99 {np.percentile(latency, 99):.0f} ms;  TTFT p50 "
          f"{np.median(ttft):.0f} ms  p99 {np.percentile(ttft, 99):.0f} ms;  {args.requests / wall:.1f} requests/s, "
          f"{tokens / wall:.0f} tokens/s")
    print(f"\n| {date.today()} | batch {batch['batch']} | {args.requests} / {args.concurrency} | "
          f"{np.median(latency):.0f} / {np.percentile(latency, 99):.0f} | {np.median(ttft):.0f} / "
          f"{np.percentile(ttft, 99):.0f} | {args.requests / wall:.1f} | {tokens / wall:.0f} | "
          f"{rows / max(steps, 1):.2f} | {len(failed)} / {wrong} | {platform.machine()}, {os.cpu_count()} cores |")


def export_tiny(work: Path, batch: str) -> Path:
    from mindvl.testing.checkpoints import write_checkpoint

    model = write_checkpoint(work / "model", "tiny")
    (work / "buckets.yaml").write_text(SPEC.format(batch=batch))
    subprocess.run([sys.executable, "-m", "mindvl", "export", str(model), "-o", str(work / "artifacts"),
                    "--buckets", str(work / "buckets.yaml")], check=True, env={**os.environ, "GLOG_v": "3"})
    return work / "artifacts"


def workload(max_tokens: int) -> list[dict]:
    """Four kinds of request: two texts, one image, two images."""
    from mindvl.testing.media import sample_image

    def image(h: int, w: int, seed: int) -> dict:
        buffer = io.BytesIO()
        sample_image(h, w, seed).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    turns = [[{"type": "text", "text": "Write a short poem about the sea."}],
             [{"type": "text", "text": "List the planets of the solar system, with one fact about each."}],
             [image(224, 224, 1), {"type": "text", "text": "Describe this image."}],
             [image(224, 168, 2), image(112, 112, 3), {"type": "text", "text": "Compare the two pictures."}]]
    return [{"messages": [{"role": "user", "content": t}], "max_tokens": max_tokens} for t in turns]


def attempt(url: str, model: str, body: dict) -> dict:
    try:
        return complete(url, model, body)
    except httpx.HTTPError as e:  # counted and reported: a load test must not stop at the first failure
        return {"error": f"{type(e).__name__}: {e}"}


def complete(url: str, model: str, body: dict) -> dict:
    """One streamed completion: its text, generated tokens, latency and time to first text (seconds)."""
    start, first, text, tokens = time.perf_counter(), None, [], 0
    request = {**body, "model": model, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "latency": end - start, "ttft": (first or end) - start}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> str:
    """The model id, once /health answers."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}; see {log}")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()["model"]
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit("the server did not start within 300 s")


def series(metrics: str, name: str) -> float:
    return next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith(name + " "))


if __name__ == "__main__":
    main()
