"""Choose a bucket spec for a workload: the buckets that minimise the expected compute off native per request
(`plan.evaluate`) within a graph count and a memory budget, keeping every image and video at or above the fidelity
floor where the graph count allows. Deterministic: candidates, searches and ties are ordered.

  1. Images: candidates are the workload's native sizes (what the model's processor makes of each image). For
     k = 1, 2, ... buckets: greedily add the candidate that most lowers (inputs below the floor, waste + lost tokens),
     as the fit rule (`shapes.fit`) assigns them, then swap chosen for unchosen candidates while that lowers it.
  2. Videos likewise, a candidate per clip: the frames sampling at 2 fps keeps (even, at most the clip's) at its
     native frame size, assigned by the video rule.
  3. Text, for each split of the graphs between images and videos: the prompts those buckets give, then cache
     lengths (the largest holds the longest prompt + max_tokens) and prefill lengths (a longer prompt is chunked),
     each chosen by dynamic programming over candidate lengths (cache: multiples of 128, prefill: of 32) to minimise
     unused cache slots and padding, under the memory budget (weights + every KV cache).
  4. The split with the least (inputs below the floor, compute off native) wins, then the fewest graphs.
Batch buckets are the caller's: `mindvl plan --batch`, or the concurrency a logged workload shows
(`plan.workload.batch_buckets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mindvl.errors import MindVLError
from mindvl.plan.cost import CostModel
from mindvl.plan.evaluate import evaluate, fit_inputs, text_gflop, visual_tokens
from mindvl.plan.workload import Request, Video
from mindvl.shapes.buckets import (
    BucketSpec,
    ImageBucket,
    VideoBucket,
    choose_text_buckets,
    choose_video_bucket,
)
from mindvl.shapes.fit import FIDELITY_FLOOR, Fit, rule_key
from mindvl.shapes.image import ProcessorConfig, smart_resize
from mindvl.shapes.video import FPS, MAX_FRAMES, MIN_FRAMES, sample_frame_indices

CACHE_STEP, PREFILL_STEP = 128, 32
MAX_TEXT_LENGTHS = 4  # per kind (cache, prefill): more rarely pays for its graphs


class PlanError(MindVLError):
    """No spec fits the budgets, or the workload has an input no bucket could take."""


@dataclass(frozen=True)
class Budget:
    max_graphs: int
    max_memory_bytes: int | None  # weights + every KV cache; None: no limit
    weights_bytes: int
    floor: float = FIDELITY_FLOOR
    batch: tuple[int, ...] = (1,)
    dtype: str = "float32"
    dtype_bytes: int = 4


def plan(requests: list[Request], cost: CostModel, proc: ProcessorConfig, budget: Budget) -> BucketSpec:
    images = _weights(((h, w), r.weight) for r in requests for h, w in r.images)
    videos = _weights((v, r.weight) for r in requests for v in r.videos)
    for video in videos:
        if video.frames < 2:
            raise PlanError(f"a video of {video.frames} frame ({video.height}x{video.width}) in the workload: video "
                            f"buckets take at least 2 frames (Qwen2-VL's temporal patch); send it as an image, or "
                            f"leave it out of the workload")
    text_min = len(budget.batch) * 2  # one cache: its decode graph and one prefill graph, per batch size
    room = budget.max_graphs - text_min - bool(videos)
    if room < bool(images):
        need = text_min + bool(images) + bool(videos)
        raise PlanError(f"--max-graphs {budget.max_graphs} cannot hold this workload: it needs at least {need} "
                        f"graphs ({'an image bucket, ' * bool(images)}{'a video bucket, ' * bool(videos)}a prefill "
                        f"and a decode graph per batch size); raise --max-graphs to {need} or more")
    image_plans = _image_plans(images, proc, budget.floor, max(room, 0)) if images else {0: ()}
    video_plans = _video_plans(videos, proc, budget.floor, max(room, 0)) if videos else {0: ()}
    best, best_key = None, None
    for k_images, image_set in image_plans.items():
        for k_videos, video_set in video_plans.items():
            left = budget.max_graphs - k_images - k_videos
            if left < text_min:
                continue
            base = BucketSpec(image_set, video_set, budget.batch, (1,), (2,), budget.dtype, budget.floor)
            spec = _text(base, requests, cost, proc, budget, left)
            if spec is None:
                continue
            result = evaluate(spec, requests, cost, proc)
            key = (result.refused, result.below_floor, round(result.off_native_gflop, 6), graph_count(spec))
            if best_key is None or key < best_key:
                best, best_key = spec, key
    if best is None:
        raise PlanError(_memory_message(requests, cost, proc, budget, image_plans, video_plans))
    return best


def graph_count(spec: BucketSpec) -> int:
    return len(spec.images) + len(spec.videos) + len(spec.batch) * (len(spec.cache) + len(spec.prefill_cache_pairs()))


def memory_bytes(spec: BucketSpec, cost: CostModel, weights_bytes: int, dtype_bytes: int) -> int:
    return weights_bytes + sum(cost.kv_bytes(b, c, dtype_bytes) for b in spec.batch for c in spec.cache)


def _weights(items) -> dict:
    out: dict = {}
    for key, weight in items:
        out[key] = out.get(key, 0.0) + weight
    return dict(sorted(out.items(), key=lambda kv: repr(kv[0])))


# --- images and videos ------------------------------------------------------------------------------------------


def _image_plans(images: dict, proc: ProcessorConfig, floor: float, room: int) -> dict[int, tuple]:
    """For each bucket count k: the image buckets chosen for it."""
    sources = list(images)
    natives = [smart_resize(h, w, proc.factor, proc.min_pixels, proc.max_pixels) for h, w in sources]
    candidates = sorted(set(natives), key=lambda s: (s[0] * s[1], s))
    weights = np.array([images[s] for s in sources])
    # rank[i, j]: the place of candidate j in the fit rule's order for image i; below/cost: what taking it means.
    rank = np.zeros((len(sources), len(candidates)), np.int64)
    below = np.zeros_like(rank, dtype=bool)
    off = np.zeros(rank.shape)
    for i, (source, native) in enumerate(zip(sources, natives, strict=True)):
        fits = [Fit(c, source, native, proc.factor) for c in candidates]
        order = sorted(range(len(candidates)), key=lambda j: rule_key(fits[j], floor))
        rank[i, order] = np.arange(len(candidates))
        below[i] = [not f.admissible(floor) for f in fits]
        off[i] = [float(f.waste + f.lost) for f in fits]

    def score(chosen: Sequence[int]) -> tuple[float, float]:
        cols = np.asarray(chosen)
        pick = cols[rank[:, cols].argmin(axis=1)]
        rows = np.arange(len(sources))
        return float(weights @ below[rows, pick]), round(float(weights @ off[rows, pick]), 6)

    return {k: tuple(ImageBucket(*candidates[j]) for j in chosen)
            for k, chosen in _grow(len(candidates), min(room, len(candidates)), score).items()}


def _video_plans(videos: dict, proc: ProcessorConfig, floor: float, room: int) -> dict[int, tuple]:
    clips = list(videos)
    candidates = sorted({_video_candidate(v, proc) for v in clips}, key=lambda b: (b.frames, b.pixels, b.name))
    fit = proc.fit_args(floor)

    def score(chosen: Sequence[int]) -> tuple[float, float]:
        below = off = 0.0
        for clip in clips:
            try:
                c = choose_video_bucket(clip.frames, clip.fps, clip.height, clip.width,
                                        [candidates[j] for j in chosen], fps=FPS, **fit)
            except MindVLError:
                below, off = below + videos[clip], off + videos[clip] * 1e12
                continue
            below += videos[clip] * (not c.fit.admissible(floor))
            off += videos[clip] * float(c.fit.waste + c.fit.lost) * c.groups
        return below, round(off, 6)

    return {k: tuple(candidates[j] for j in chosen)
            for k, chosen in _grow(len(candidates), min(room, len(candidates)), score).items()}


def _video_candidate(video: Video, proc: ProcessorConfig) -> VideoBucket:
    want = len(sample_frame_indices(video.frames, video.fps or FPS, fps=FPS, min_frames=MIN_FRAMES,
                                    max_frames=MAX_FRAMES))
    frames = max(2, min(want, video.frames) // 2 * 2)
    return VideoBucket(frames, *smart_resize(video.height, video.width, proc.factor, proc.min_pixels,
                                             proc.max_pixels))


def _grow(n: int, most: int, score: Callable[[Sequence[int]], tuple]) -> dict[int, tuple[int, ...]]:
    """For k = 1..most: k of the n candidates, grown greedily from k - 1 and improved by single swaps."""
    plans, chosen = {}, []
    for k in range(1, most + 1):
        rest = [j for j in range(n) if j not in chosen]
        chosen = sorted(chosen + [min(rest, key=lambda j: (score(sorted(chosen + [j])), j))])
        best = score(chosen)
        improved = True
        while improved:
            improved = False
            for out in list(chosen):
                for j in range(n):
                    if j in chosen:
                        continue
                    trial = sorted([c for c in chosen if c != out] + [j])
                    if score(trial) < best:
                        chosen, best, improved = trial, score(trial), True
                        break
                if improved:
                    break
        plans[k] = tuple(chosen)
        if best[0] == 0 and best[1] == 0:
            break  # every input at its native size: more buckets cannot help
    return plans


# --- text -------------------------------------------------------------------------------------------------------


def _text(base: BucketSpec, requests: list[Request], cost: CostModel, proc: ProcessorConfig, budget: Budget,
          graphs: int) -> BucketSpec | None:
    """The cache and prefill lengths for the prompts `base`'s visual buckets give, in `graphs` text graphs and the
    memory budget; None when none fit."""
    prompts = _prompts(base, requests, proc)
    weights = np.array([r.weight for r in requests])
    new = np.array([r.max_tokens for r in requests])
    need = prompts + new
    cache_options = _lengths(need, CACHE_STEP)
    best, best_cost = None, math.inf
    for caches in _choose(cache_options, need, weights * (prompts + new) * cost.slot_gflop(), required=True):
        used = memory_bytes(BucketSpec((), (), budget.batch, (min(caches),), caches), cost, budget.weights_bytes,
                            budget.dtype_bytes)
        if budget.max_memory_bytes is not None and used > budget.max_memory_bytes:
            continue
        prefill_options = [s for s in _lengths(prompts, PREFILL_STEP) if s <= max(caches)]
        for prefills in _prefills(prefill_options, prompts, weights):
            spec = BucketSpec(base.images, base.videos, budget.batch, prefills, caches, budget.dtype, budget.floor)
            if graph_count(spec) - len(spec.images) - len(spec.videos) > graphs:
                continue
            total = _text_cost(spec, prompts, new, weights, cost)
            if total < best_cost - 1e-9:
                best, best_cost = spec, total
    return best


def _prompts(spec: BucketSpec, requests: list[Request], proc: ProcessorConfig) -> np.ndarray:
    """Each request's prompt tokens once its images and videos take `spec`'s buckets (the text alone for a request
    whose inputs take none: the evaluation refuses it anyway)."""
    prompts = []
    for r in requests:
        try:
            prompts.append(r.text_tokens + visual_tokens(fit_inputs(r, spec, proc)))
        except MindVLError:
            prompts.append(r.text_tokens)
    return np.array(prompts)


def _lengths(values: np.ndarray, step: int) -> list[int]:
    return sorted({int(math.ceil(v / step) * step) for v in values})


def _choose(options: list[int], values: np.ndarray, unit: np.ndarray, required: bool) -> list[tuple[int, ...]]:
    """For each count k (1..MAX_TEXT_LENGTHS): the k options, the largest included when `required`, that minimise
    sum(unit × (option taken - value)) with each value taking the smallest option >= it (dynamic programming)."""
    m = len(options)
    # cost[a][j]: the values in (options[a-1], options[j]] all taking options[j] (a = 0: every value <= options[j]).
    cost = np.full((m + 1, m), math.inf)
    for j, top in enumerate(options):
        for a in range(j + 1):
            low = options[a - 1] if a else -math.inf
            inside = (values > low) & (values <= top)
            cost[a][j] = float(unit[inside] @ (top - values[inside]))
    results = []
    best = {(1, j): (cost[0][j], (j,)) for j in range(m)}
    for k in range(1, min(MAX_TEXT_LENGTHS, m) + 1):
        if k > 1:
            best.update({(k, j): min(((best[k - 1, i][0] + cost[i + 1][j], best[k - 1, i][1] + (j,))
                                      for i in range(j) if (k - 1, i) in best), default=(math.inf, ()))
                         for j in range(m)})
        last = m - 1 if required else None
        ends = [last] if last is not None else range(m)
        done = min((best[k, j] for j in ends if (k, j) in best and best[k, j][0] < math.inf), default=None)
        if done is not None:
            results.append(tuple(options[j] for j in done[1]))
    return results


def _prefills(options: list[int], prompts: np.ndarray, weights: np.ndarray) -> list[tuple[int, ...]]:
    """Prefill length sets of 1..MAX_TEXT_LENGTHS lengths: for each count, the set with the least padding, and the
    same set without its largest length (a prompt beyond the rest is then chunked: fewer graphs, more calls)."""
    sets = _choose(options, prompts.astype(float), weights, required=True)
    return sets + [s[:-1] for s in sets if len(s) > 1]


def _text_cost(spec: BucketSpec, prompts: np.ndarray, new: np.ndarray, weights: np.ndarray,
               cost: CostModel) -> float:
    """The text compute off native of every prompt in `spec`'s text buckets, as the text rule assigns them."""
    total = 0.0
    for p, n, w in zip(prompts, new, weights, strict=True):
        try:
            text = choose_text_buckets(int(p), int(n), spec, spec.batch[0])
        except MindVLError:
            return math.inf
        spent, ideal = text_gflop(text, int(p), int(n), cost)
        total += w * (spent - ideal)
    return total


def _memory_message(requests: list[Request], cost: CostModel, proc: ProcessorConfig, budget: Budget,
                    image_plans: dict[int, tuple], video_plans: dict[int, tuple]) -> str:
    smallest = BucketSpec(image_plans[max(image_plans)] if image_plans else (),
                          video_plans[max(video_plans)] if video_plans else (), budget.batch, (1,), (2,),
                          budget.dtype, budget.floor)
    prompts = _prompts(smallest, requests, proc)
    longest = int(max(prompts + np.array([r.max_tokens for r in requests])))
    cache = int(math.ceil(longest / CACHE_STEP) * CACHE_STEP)
    need = budget.weights_bytes + sum(cost.kv_bytes(b, cache, budget.dtype_bytes) for b in budget.batch)
    return (f"no bucket spec fits --max-memory {budget.max_memory_bytes / 2**30:.2f} GB: the weights "
            f"({budget.weights_bytes / 2**30:.2f} GB) and the {cache}-slot cache the longest request ({longest} "
            f"tokens with its max_tokens) needs take {need / 2**30:.2f} GB; raise --max-memory to "
            f"{math.ceil(need / 2**30 * 100) / 100:.2f} or more, or lower the requests' max_tokens")

