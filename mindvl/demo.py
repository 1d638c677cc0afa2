"""`mindvl demo`: Qwen2-VL answers image and video prompts in graph mode and in pynative, with latencies.

Without `--model` it uses a tiny random Qwen2-VL written to the cache folder (no hub is reachable), so its
answers are noise; what it shows is the whole path from a Hugging Face folder and real media files to tokens,
and the per-token latency of each execution mode. With `--model`, `--prompt`, `--image`, `--video` it runs
that one prompt on that checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median

from mindvl import __version__
from mindvl.fixtures import write_checkpoint
from mindvl.samples import sample_image, write_sample_video


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mindvl"


def _default_prompts(folder: Path) -> list[tuple[str, dict]]:
    folder.mkdir(parents=True, exist_ok=True)
    image, video = folder / "demo.png", folder / "demo.mp4"
    # Written beside and renamed, so an interrupted demo never leaves a half-written file to be reused.
    if not image.is_file():
        sample_image(168, 224, seed=0).save(image.with_suffix(".tmp.png"))
        os.replace(image.with_suffix(".tmp.png"), image)
    if not video.is_file():
        write_sample_video(video.with_suffix(".tmp.mp4"), frames=16, size=(112, 112), fps=4)
        os.replace(video.with_suffix(".tmp.mp4"), video)
    return [("Describe this image.", {"images": [image]}), ("What happens in this video?", {"videos": [video]})]


def run_demo(model_dir: str | Path | None = None, prompt: str | None = None, images: Sequence[str] = (),
             videos: Sequence[str] = (), cache_dir: str | Path | None = None, max_new_tokens: int = 16,
             device: str | None = None) -> None:
    from mindvl.qwen2vl import load
    from mindvl.shapes.processor import Processor

    start = time.perf_counter()
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if model_dir is None:
        # Versioned: the fixture's bytes may change between releases, and a stale folder is refused.
        model_dir = write_checkpoint(folder / f"tiny-qwen2-vl-{__version__}", "tiny")
    if prompt is None and not images and not videos:
        prompts = _default_prompts(folder)
    else:
        prompts = [(prompt or "Describe this.", {"images": list(images), "videos": list(videos)})]
    processor = Processor(model_dir)
    # Media and prompts are checked before the (slow) model load, so bad input fails fast.
    prepared = [(text, media, processor(text, **media)) for text, media in prompts]
    model = load(model_dir, device=device)
    print(f"Qwen2-VL from {model_dir} on {model.device}, {model.dtype}, loaded in {time.perf_counter() - start:.1f} s"
          + ("; a tiny random model: its answers are random tokens" if len(prompts) == 2 and prompt is None else ""))

    speedups = []
    for text, media, inputs in prepared:
        files = ", ".join(Path(f).name for f in [*media.get("images", []), *media.get("videos", [])])
        grids = [f"{'×'.join(map(str, g))}" for key in ("image_grid_thw", "video_grid_thw") for g in inputs.get(key, [])]
        print(f"\n{text!r} + {files or 'no media'} (grids t×h×w {', '.join(grids) or '-'}; "
              f"{inputs['input_ids'].shape[1]} prompt tokens)")
        model_inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        start = time.perf_counter()
        model.generate(**model_inputs, max_new_tokens=max_new_tokens, mode="graph")
        compile_s = time.perf_counter() - start
        per_token = {}
        for mode in ("graph", "pynative"):
            gen = model.generate(**model_inputs, max_new_tokens=max_new_tokens, mode=mode)
            per_token[mode] = median(gen.decode_ms) if gen.decode_ms else float("nan")
            answer = processor.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
            print(f"  {mode:<9} prefill {gen.prefill_ms:8.1f} ms   decode {per_token[mode]:8.2f} ms/token   "
                  f"{len(gen.token_ids)} tokens: {answer!r}")
        print(f"  (graph mode's first call, which compiles its graphs, took {compile_s:.1f} s)")
        speedups.append(per_token["pynative"] / per_token["graph"])
    spread = f"{min(speedups):.0f}×" if len(speedups) == 1 else f"{min(speedups):.0f}–{max(speedups):.0f}×"
    print(f"\ngraph mode decodes {spread} faster per token than pynative here.")
