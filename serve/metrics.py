"""Counters, gauges and histograms in Prometheus' text format (version 0.0.4), written by hand: a handful of
series does not need a client library. Updated from the event loop and the worker thread, hence the lock."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Callable

# Seconds; TTFT includes queueing, so its buckets reach further than the per-token ones.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum = buckets, [0] * (len(buckets) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(lambda: defaultdict(float))
        for name in UNLABELLED:  # shown from the start, at 0
            self._counters[name][()] = 0
        self._histograms = {
            "mindvl_time_to_first_token_seconds": Histogram(LATENCY_BUCKETS),
            "mindvl_time_per_output_token_seconds": Histogram(TOKEN_BUCKETS),
            "mindvl_request_duration_seconds": Histogram(LATENCY_BUCKETS),
        }

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read` gives at scrape time."""
        self._gauges[name] = (help, read)

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._histograms[name].observe(seconds)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name in sorted(self._counters):
                lines += [f"# HELP {name} {HELP[name]}", f"# TYPE {name} counter"]
                for labels, value in sorted(self._counters[name].items()):
                    lines.append(f"{name}{_labels(labels)} {value:g}")
            for name, histogram in self._histograms.items():
                lines += [f"# HELP {name} {HELP[name]}", f"# TYPE {name} histogram", *histogram.lines(name)]
        for name, (text, read) in self._gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"


HELP = {
    "mindvl_requests_total": "HTTP requests answered, by path and status.",
    "mindvl_request_errors_total": "HTTP requests answered with an error status (>= 400), by status.",
    "mindvl_cancelled_total": "Requests dropped before their end: the client left or a stop string was met.",
    "mindvl_worker_failures_total": "Requests failed inside the worker (each alone; the others went on).",
    "mindvl_prompt_tokens_total": "Prompt tokens of the generations started.",
    "mindvl_completion_tokens_total": "Tokens generated.",
    "mindvl_decode_steps_total": "Decode steps run (one graph call each, for every decoding row of the batch).",
    "mindvl_prefill_calls_total": "Prefill graph calls run: one per chunk of the rows prefilling together.",
    "mindvl_prefix_hits_total": "Requests whose prompt began with what a cache row held already (prefix reuse).",
    "mindvl_prefix_reused_tokens_total": "Prompt tokens a cache row held already, not prefilled again.",
    "mindvl_vision_cache_hits_total": "Images and videos whose visual tokens came from the vision cache.",
    "mindvl_decode_rows_total": "Rows decoded, summed over decode steps: divided by the steps, the mean batch use.",
    "mindvl_bucket_inputs_total": "Images and videos fitted to each vision or video graph's bucket.",
    "mindvl_bucket_padded_tokens_total": "Tokens computed that carry nothing the input has, by graph: a vision or "
                                         "video bucket's beyond the image (upscaled, stretched), a prefill graph's "
                                         "past the prompt.",
    "mindvl_bucket_lost_tokens_total": "Native tokens of images and videos that their vision or video bucket cannot "
                                       "hold (scaled down), by graph.",
    "mindvl_bucket_requests_total": "Requests admitted, by the prefill graph of their last prefill call.",
    "mindvl_time_to_first_token_seconds": "From a request's arrival to its first generated token, queueing included.",
    "mindvl_time_per_output_token_seconds": "Between consecutive generated tokens of one request.",
    "mindvl_request_duration_seconds": "From a chat completion's arrival to its last byte.",
}

UNLABELLED = ("mindvl_cancelled_total", "mindvl_worker_failures_total", "mindvl_prompt_tokens_total",
              "mindvl_completion_tokens_total", "mindvl_decode_steps_total", "mindvl_decode_rows_total",
              "mindvl_prefill_calls_total", "mindvl_prefix_hits_total", "mindvl_prefix_reused_tokens_total",
              "mindvl_vision_cache_hits_total")


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
