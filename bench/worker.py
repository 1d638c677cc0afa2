"""One `mindvl bench` mode in its own process, so each mode's memory and cold start are its own.

    python -m mindvl.bench.worker MODE SETUP.json        MODE: runtime | onnx | graph | pynative | transformers

Prints one JSON line when ready (cold start: process start → model loaded → first token), then answers
each "run" line on stdin with one JSON line of timings, a JSON line {"messages": [...], "new_tokens": N} (a
conversation in the chat template's form, about the setup's images, instead of the setup's prompt) likewise, and
"stats" with its peak resident memory. Every mode gets the same inputs: the prompt and image prepared by the
runtime's bucket policy.
"""

from __future__ import annotations

import json
import resource
import sys
import time

STARTED = time.perf_counter()

from pathlib import Path  # noqa: E402
from typing import Callable, Sequence  # noqa: E402


def _messages(setup: dict, messages: Sequence[dict] | None) -> Sequence[dict]:
    """The conversation a run answers: the one asked for, else the setup's prompt as one user turn."""
    from mindvl.shapes.prompt import user_turn

    return messages or [user_turn(setup["prompt"], len(setup["images"]), 0)]


def _runtime(setup: dict, fmt: str = "mindir") -> tuple[Callable[..., dict], Callable[[], dict]]:
    from mindvl.runtime import Runtime

    # Every repeat sends the same request: without the caches off, repeats would measure prefix reuse and the vision
    # cache, not a request as it first arrives.
    rt = Runtime.load(setup["artifacts"], device=setup.get("device"), prefix_cache_mb=0, vision_cache_mb=0, fmt=fmt)

    def run(new_tokens: int, messages: Sequence[dict] | None = None) -> dict:
        out = rt.chat(_messages(setup, messages), images=setup["images"], max_new_tokens=new_tokens)
        t = out.timings
        return {"vision_ms": t["vision"], "prefill_ms": t["prefill"],
                "ttft_ms": t["preprocess"] + t["vision"] + t["prefill"], "decode_ms": out.decode_steps_ms}

    def ranks() -> dict:
        """A tensor-parallel artifact's ranks, each with its own peak memory (this process is their driver)."""
        return {"ranks": rt.artifacts.executor.stats()} if rt.artifacts.manifest.tp > 1 else {}

    return run, ranks


def _model(setup: dict, mode: str) -> Callable[[], dict]:
    from mindvl.qwen2vl import load
    from mindvl.shapes.buckets import BucketSpec
    from mindvl.shapes.processor import Processor

    model = load(setup["model"], dtype=setup["dtype"], device=setup.get("device"))
    processor = Processor(setup["model"], BucketSpec.from_dict(setup["buckets"]))

    def run(new_tokens: int, messages: Sequence[dict] | None = None) -> dict:
        start = time.perf_counter()
        inputs = processor.prepare_chat(_messages(setup, messages), images=setup["images"]).model_inputs()
        del inputs["attention_mask"]
        preprocess_ms = (time.perf_counter() - start) * 1e3
        gen = model.generate(**inputs, max_new_tokens=new_tokens, mode=mode, stop_ids=())
        return {"vision_ms": gen.vision_ms, "prefill_ms": gen.prefill_ms,
                "ttft_ms": preprocess_ms + gen.vision_ms + gen.prefill_ms, "decode_ms": gen.decode_ms}

    return run


def _transformers(setup: dict) -> Callable[[], dict]:
    import torch
    from transformers import Qwen2VLForConditionalGeneration, StoppingCriteria

    from mindvl.shapes.buckets import BucketSpec
    from mindvl.shapes.processor import Processor

    model = Qwen2VLForConditionalGeneration.from_pretrained(setup["model"], dtype=getattr(torch, setup["dtype"])).eval()
    processor = Processor(setup["model"], BucketSpec.from_dict(setup["buckets"]))

    class Clock(StoppingCriteria):
        """Called once per generated token: its timestamps give time to first token and each decode step."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    vision_span: list[float] = []
    model.model.visual.register_forward_pre_hook(lambda *_: vision_span.append(time.perf_counter()))
    model.model.visual.register_forward_hook(lambda *_: vision_span.append(time.perf_counter()))

    @torch.inference_mode()
    def run(new_tokens: int, messages: Sequence[dict] | None = None) -> dict:
        start = time.perf_counter()
        inputs = processor.prepare_chat(_messages(setup, messages), images=setup["images"]).model_inputs()
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        preprocess_done = time.perf_counter()
        clock = Clock()
        vision_span.clear()
        model.generate(**tensors, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=[clock], temperature=None, top_p=None, top_k=None)
        steps = [(b - a) * 1e3 for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=True)]
        vision_ms = (vision_span[1] - vision_span[0]) * 1e3
        first = (clock.stamps[0] - preprocess_done) * 1e3
        return {"vision_ms": vision_ms, "prefill_ms": first - vision_ms,
                "ttft_ms": (preprocess_done - start) * 1e3 + first, "decode_ms": steps}

    return run


def main() -> None:
    mode, setup = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    more_stats: Callable[[], dict] = dict
    if mode in ("runtime", "onnx"):
        run, more_stats = _runtime(setup, "onnx" if mode == "onnx" else "mindir")
    elif mode == "transformers":
        run = _transformers(setup)
    else:
        run = _model(setup, mode)
    loaded = time.perf_counter()
    run(1)
    first_token = time.perf_counter()
    run(setup["new_tokens"])  # warm-up: graph compilation and first-touch allocations stay out of the figures
    print(json.dumps({"load_s": loaded - STARTED, "cold_start_s": first_token - STARTED,
                      "warmup_s": time.perf_counter() - first_token}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(run(setup["new_tokens"])), flush=True)
        elif line.startswith("{"):
            request = json.loads(line)
            print(json.dumps(run(request["new_tokens"], request["messages"])), flush=True)
        elif line.strip() == "stats":
            print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                              **more_stats()}), flush=True)


if __name__ == "__main__":
    main()
