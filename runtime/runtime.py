"""The runtime: exported graphs only, no model code. vision → prefill → decode with an in-place KV cache.

    prompt, images, videos ──Processor (bucket policy)──▶ token ids + patches per image/video
        ──vision_{H}x{W} / video_{T}x{H}x{W}──▶ visual tokens, placed at the pad positions of the embeddings
        ──prefill_b1_s{S}_c{C}──▶ first token ──decode_b1_c{C} × n──▶ tokens ──▶ text

One request is a batch of one (`runtime/batch.py`); `mindvl serve` batches several through the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Iterator, Sequence

import numpy as np

from mindvl.device import refuse_bfloat16_on_cpu, select_device
from mindvl.errors import RequestError
from mindvl.runtime.artifacts import Artifacts
from mindvl.runtime.batch import Batch, Generation, Prompt
from mindvl.runtime.detokenize import StreamDecoder
from mindvl.runtime.sampling import Sampling
from mindvl.shapes.buckets import TextChoice, choose_text_buckets
from mindvl.shapes.processor import ImageInput, Prepared, Processor, VideoInput
from mindvl.shapes.rope_index import rope_index
from mindvl.shapes.text_inputs import place_visual
from mindvl.shapes.vision_inputs import vision_rotary


@dataclass
class Output:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    buckets: dict[str, Any] = field(default_factory=dict)  # graphs used, and how each input was fitted
    # ms: preprocess, vision, prefill, decode_per_token (median), total, and graph_load (first use of a graph,
    # counted inside vision and prefill)
    timings: dict[str, float] = field(default_factory=dict)
    logits: list[np.ndarray] = field(default_factory=list)  # [vocab] per generated token, with keep_logits=True
    decode_steps_ms: list[float] = field(default_factory=list)  # every decode step's time


class Runtime:
    def __init__(self, artifacts: Artifacts, device: str) -> None:
        self.artifacts, self.device = artifacts, device
        self.config = artifacts.config
        self.buckets = artifacts.buckets
        self.processor = Processor(artifacts.tokenizer_dir, self.buckets)

    @classmethod
    def load(cls, artifacts: str | Path, device: str | None = None, verify: bool = True) -> Runtime:
        """Check and load an artifact folder; `verify=False` skips hashing the weights file (graph and
        tokenizer files are always checked)."""
        device = select_device(device)
        loaded = Artifacts(artifacts, verify=verify)
        refuse_bfloat16_on_cpu(loaded.dtype, device)
        return cls(loaded, device)

    def generate(self, prompt: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, keep_logits: bool = False) -> Output:
        out = Output()
        for _ in self._stream(out, prompt, images, videos, max_new_tokens, Sampling(temperature, top_p, top_k, seed),
                              keep_logits):
            pass
        return out

    def stream(self, prompt: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, output: Output | None = None) -> Iterator[str]:
        """Text pieces as they are generated; pass `output` to also receive ids, buckets and timings."""
        yield from self._stream(output or Output(), prompt, images, videos, max_new_tokens,
                                Sampling(temperature, top_p, top_k, seed))

    def _stream(self, out: Output, prompt: str, images: Sequence[ImageInput], videos: Sequence[VideoInput],
                max_new_tokens: int, sampling: Sampling, keep_logits: bool = False) -> Iterator[str]:
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens is {max_new_tokens}; ask for at least 1 token")
        start, loaded_before = time.perf_counter(), self.artifacts.graph_load_ms
        chosen: list[TextChoice] = []  # the text buckets, chosen once the prompt is counted and before decoding
        prepared = self.processor.prepare(
            prompt, images, videos, check_length=lambda n: chosen.append(choose_text_buckets(n, max_new_tokens,
                                                                                             self.buckets)))
        out.timings["preprocess"] = (time.perf_counter() - start) * 1e3
        length, [text] = prepared.input_ids.shape[1], chosen
        batch = Batch(self.artifacts, text.batch, text.cache)
        prefill, decode = batch.graph_names(length)
        out.prompt_tokens = length
        out.buckets = {"prefill": prefill, "decode": decode, "prefill_padding_tokens": text.padding_tokens,
                       "inputs": [v.choice.describe() for v in prepared.visuals]}

        begin = time.perf_counter()
        encoded = self.encode(prepared)
        out.buckets["vision"] = encoded.vision_graphs
        out.timings["vision"] = (time.perf_counter() - begin) * 1e3

        generation = self.new_generation(encoded, max_new_tokens, sampling, keep_logits)
        out.token_ids, out.logits = generation.token_ids, generation.logits  # filled as tokens come
        [(_, piece)] = batch.add([generation])
        out.timings["prefill"] = batch.call_ms
        steps = out.decode_steps_ms
        while True:
            if generation.error is not None:
                raise generation.error
            if piece:
                yield piece
            if generation.finish:
                break
            [(_, piece)] = batch.step()
            steps.append(batch.call_ms)
        out.text = generation.text
        out.timings["decode_per_token"] = median(steps) if steps else 0.0
        out.timings["graph_load"] = self.artifacts.graph_load_ms - loaded_before  # within vision and prefill
        out.timings["total"] = (time.perf_counter() - start) * 1e3

    def encode(self, prepared: Prepared) -> Prompt:
        """Run the vision graphs and place their output: the prompt as the text graphs take it."""
        embeds, vision_graphs = self._embed(prepared)
        position_ids, rope_deltas = self._positions(prepared)
        return Prompt(embeds[0], position_ids[:, 0], int(rope_deltas[0, 0]), vision_graphs)

    def new_generation(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling,
                     keep_logits: bool = False) -> Generation:
        """A generation of `prompt` for a `Batch`: greedy or sampled, ending on the model's end tokens."""
        tokenizer = self.processor.tokenizer
        decoder = StreamDecoder(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        return Generation(prompt, max_new_tokens, sampling, decoder, frozenset(tokenizer.eos_token_ids), keep_logits)

    def _embed(self, prepared: Prepared) -> tuple[np.ndarray, list[str]]:
        """Token embeddings with each image's and video's visual tokens over its pad tokens."""
        v = self.config.vision
        embeds = self.artifacts.embed[prepared.input_ids]  # a copy, in the host dtype already
        names = []
        for kind, graph_kind, token_id in (("image", "vision", self.config.image_token_id),
                                           ("video", "video", self.config.video_token_id)):
            features = []
            for visual in (x for x in prepared.visuals if x.kind == kind):
                b = visual.choice.bucket
                spec = self.artifacts.manifest.find(graph_kind, frames=getattr(b, "frames", 1), height=b.height,
                                                    width=b.width)
                cos, sin = vision_rotary(visual.grid[None], v.head_dim, v.spatial_merge_size)
                features.append(self.artifacts.run(spec, {"patches": visual.pixels, "cos": cos, "sin": sin}))
                names.append(spec.name)
            if features:
                place_visual(embeds, prepared.input_ids, token_id, np.concatenate(features))
        return embeds, names

    def _positions(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return rope_index(prepared.input_ids, prepared.grid_thw("image"), prepared.grid_thw("video"),
                          image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                          vision_start_token_id=c.vision_start_token_id,
                          spatial_merge_size=c.vision.spatial_merge_size)
