"""What a bucket spec costs on a workload, through the very rules the runtime and the server apply
(`choose_image_bucket`, `choose_video_bucket`, `choose_text_buckets`): the numbers `mindvl plan` reports for its plan
and for `--against SPEC`, side by side.

Per request, in GFLOP (`plan.cost`): its compute, and its compute off native — what its buckets compute beyond what
its inputs carry (upscaled, stretched and padded tokens, cache slots beyond its need, extra LM heads of chunked
prefill) plus what its inputs' lost tokens would have cost. A request no bucket can take is counted as refused.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from mindvl.errors import MindVLError
from mindvl.plan.cost import CostModel
from mindvl.plan.workload import Request
from mindvl.shapes.buckets import (
    BucketSpec,
    ImageChoice,
    TextChoice,
    VideoChoice,
    choose_image_bucket,
    choose_text_buckets,
    choose_video_bucket,
)
from mindvl.shapes.image import ProcessorConfig
from mindvl.shapes.video import FPS


@dataclass
class BucketUse:
    """One vision or video bucket on the workload: weights are request weights (shares of the sample)."""

    inputs: float = 0.0  # images or videos fitted to it
    waste_tokens: float = 0.0  # computed, carrying nothing of the input
    lost_tokens: float = 0.0  # of the native input, not held
    below_floor: float = 0.0  # inputs kept below the fidelity floor
    stretch: float = 0.0  # summed max(r, 1/r): mean aspect distortion = stretch / inputs


@dataclass
class Evaluation:
    requests: float = 0.0
    refused: float = 0.0  # requests no bucket could take (a text or video rule refused them)
    refusals: list[str] = field(default_factory=list)  # the first few reasons
    gflop: float = 0.0  # summed over the requests served
    off_native_gflop: float = 0.0
    prompt_tokens: float = 0.0
    visual_tokens: float = 0.0
    waste_tokens: float = 0.0
    lost_tokens: float = 0.0
    below_floor: float = 0.0  # images and videos kept below the floor
    padding_tokens: float = 0.0  # prompt positions past the prompt in the last prefill call
    buckets: dict[str, BucketUse] = field(default_factory=lambda: defaultdict(BucketUse))

    def per_request(self, value: float) -> float:
        served = self.requests - self.refused
        return value / served if served else 0.0


def evaluate(spec: BucketSpec, requests: list[Request], cost: CostModel, proc: ProcessorConfig) -> Evaluation:
    out = Evaluation()
    per_token = cost.visual_token_gflop()
    for request in requests:
        w = request.weight
        out.requests += w
        try:
            fitted = fit_inputs(request, spec, proc)
            gflop, off, uses = 0.0, 0.0, []
            for choice in fitted:
                waste, lost = float(choice.fit.waste) * choice.groups, float(choice.fit.lost) * choice.groups
                gflop += cost.vision_gflop(getattr(choice.bucket, "frames", 1), choice.bucket.height,
                                           choice.bucket.width)
                off += (waste + lost) * per_token
                uses.append((choice, waste, lost))
            prompt = request.text_tokens + visual_tokens(fitted)
            text = choose_text_buckets(prompt, request.max_tokens, spec, spec.batch[0])
        except MindVLError as e:
            out.refused += w
            if len(out.refusals) < 3:
                out.refusals.append(str(e))
            continue
        for choice, waste, lost in uses:
            name = choice.bucket.name if not hasattr(choice.bucket, "frames") else f"video {choice.bucket.name}"
            use = out.buckets[name]
            use.inputs += w
            use.waste_tokens += w * waste
            use.lost_tokens += w * lost
            use.below_floor += w * (not choice.fit.admissible(spec.fidelity_floor))
            use.stretch += w * float(choice.fit.stretch)
            out.visual_tokens += w * choice.fit.tokens * choice.groups
            out.waste_tokens += w * waste
            out.lost_tokens += w * lost
            out.below_floor += w * (not choice.fit.admissible(spec.fidelity_floor))
        spent, ideal = text_gflop(text, prompt, request.max_tokens, cost)
        out.gflop += w * (gflop + spent)
        out.off_native_gflop += w * (off + spent - ideal)
        out.padding_tokens += w * text.padding_tokens
        out.prompt_tokens += w * prompt
    return out


def text_gflop(text: TextChoice, prompt: int, new: int, cost: CostModel) -> tuple[float, float]:
    """A prompt's prefill and decode compute in its text buckets, and what one call and a cache that fits it exactly
    would have cost."""
    need = prompt + new
    spent = (sum(cost.text_gflop(s, text.cache) for s in text.calls) + len(text.calls) * cost.head_gflop()
             + new * (cost.text_gflop(1, text.cache) + cost.head_gflop()))
    ideal = cost.text_gflop(prompt, need) + cost.head_gflop() + new * (cost.text_gflop(1, need) + cost.head_gflop())
    return spent, ideal


def fit_inputs(request: Request, spec: BucketSpec, proc: ProcessorConfig) -> list[ImageChoice | VideoChoice]:
    """The buckets the request's images, then videos, take by the fit rules (a BucketError when one takes none)."""
    fit = proc.fit_args(spec.fidelity_floor)
    return [*(choose_image_bucket(h, w, spec.images, **fit) for h, w in request.images),
            *(choose_video_bucket(v.frames, v.fps, v.height, v.width, spec.videos, fps=FPS, **fit)
              for v in request.videos)]


def visual_tokens(fitted: list[ImageChoice | VideoChoice]) -> int:
    """The prompt tokens these fitted inputs take."""
    return sum(choice.fit.tokens * choice.groups for choice in fitted)
