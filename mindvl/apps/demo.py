"""`mindvl demo`: export a Qwen2-VL folder at a bucket preset, answer image and video prompts through the
runtime, and compare per-token latency with the same model run in pynative.

Without `--model` it uses a tiny random Qwen2-VL written to the cache folder (no hub is reachable), so its
answers are noise; what it shows is the whole path from a Hugging Face folder and real media files, through
MindIR graphs, to tokens. With `--model`, `--prompt`, `--image`, `--video` it runs that prompt on that model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median

from mindvl import __version__
from mindvl.shapes.buckets import BucketSpec
from mindvl.testing.checkpoints import write_checkpoint
from mindvl.testing.media import sample_image, write_sample_video


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


def _artifacts(model_dir: Path, folder: Path, preset: str, spec: BucketSpec) -> Path:
    """The demo's export of `model_dir`, made once and reused (the runtime re-checks its hashes)."""
    from mindvl.export import export_artifacts

    out = folder / f"{model_dir.name}-{preset}-artifacts-{__version__}"
    if not (out / "manifest.json").is_file():
        print(f"exporting {model_dir} at bucket preset {preset!r} to {out} ...")
        export_artifacts(model_dir, out, spec, force=True, log=lambda line: print("  " + line))
    return out


def run_demo(model_dir: str | Path | None = None, prompt: str | None = None, images: Sequence[str] = (),
             videos: Sequence[str] = (), preset: str = "tiny", cache_dir: str | Path | None = None,
             max_new_tokens: int = 16, device: str | None = None) -> None:
    from mindvl.qwen2vl import load
    from mindvl.runtime import Runtime
    from mindvl.shapes.config import read_config
    from mindvl.shapes.processor import Processor

    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    tiny = model_dir is None
    # Versioned: the fixture's bytes may change between releases, and a stale folder is refused.
    model_dir = Path(write_checkpoint(folder / f"tiny-qwen2-vl-{__version__}", "tiny") if tiny else model_dir)
    if prompt is None and not images and not videos:
        prompts = _default_prompts(folder)
    else:
        prompts = [(prompt or "Describe this.", {"images": list(images), "videos": list(videos)})]
    # Bad media, an input no bucket fits, or an unusable checkpoint fail here, before any export work; the
    # prepared inputs (bucketed as the runtime will) then feed the pynative comparison.
    read_config(model_dir)
    spec = BucketSpec.preset(preset)
    processor = Processor(model_dir, spec)
    prepared = [processor.prepare(text, **media).model_inputs() for text, media in prompts]

    artifacts = _artifacts(model_dir, folder, preset, spec)
    start = time.perf_counter()
    # Each prompt runs twice (the first call loads its graphs): the caches stay off, so the second is measured as a
    # request that arrives cold, like the pynative run it is compared with.
    runtime = Runtime.load(artifacts, device=device, prefix_cache_mb=0, vision_cache_mb=0)
    print(f"runtime loaded {runtime.artifacts.folder} in {time.perf_counter() - start:.1f} s on {runtime.device}"
          + ("; a tiny random model: its answers are random tokens" if tiny else ""))
    model = None  # the pynative reference is loaded only once the runtime has accepted the inputs

    speedups = []
    for (text, media), inputs in zip(prompts, prepared, strict=True):
        first = runtime.generate(text, max_new_tokens=max_new_tokens, **media)  # loads the graphs it needs
        out = runtime.generate(text, max_new_tokens=max_new_tokens, **media)
        files = ", ".join(Path(f).name for f in [*media.get("images", []), *media.get("videos", [])])
        print(f"\n{text!r} + {files or 'no media'}: {out.prompt_tokens} prompt tokens; graphs "
              f"{', '.join(out.buckets['vision'] + [out.buckets['prefill'], out.buckets['decode']])}")
        for line in out.buckets["inputs"]:
            print(f"  input {line}")
        print(f"  runtime   prefill {out.timings['prefill']:8.1f} ms   decode {out.timings['decode_per_token']:8.2f} "
              f"ms/token   (first call, loading graphs: {first.timings['total'] / 1e3:.1f} s)")
        print(f"            {len(out.token_ids)} tokens: {out.text!r}")

        if model is None:
            model = load(model_dir, dtype=runtime.artifacts.dtype, device=runtime.device)
        del inputs["attention_mask"]
        eager = model.generate(**inputs, max_new_tokens=max_new_tokens, mode="pynative")
        eager_ms = median(eager.decode_ms) if eager.decode_ms else float("nan")
        same = "same tokens" if eager.token_ids == out.token_ids else "DIFFERENT tokens"
        print(f"  pynative  prefill {eager.prefill_ms:8.1f} ms   decode {eager_ms:8.2f} ms/token   ({same})")
        speedups.append(eager_ms / out.timings["decode_per_token"])
    spread = f"{min(speedups):.0f}×" if len(speedups) == 1 else f"{min(speedups):.0f}–{max(speedups):.0f}×"
    print(f"\nthe exported graphs decode {spread} faster per token than pynative here.")
