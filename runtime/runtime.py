"""The runtime: exported graphs only, no model code. vision → prefill → decode with an in-place KV cache.

    conversation, images, videos ──Processor (bucket policy)──▶ token ids + patches per image/video
        ──the cache set and row holding the longest prefix (runtime/pool.py)──▶ tokens left to prefill
        ──vision_{H}x{W} / video_{T}x{H}x{W} (or the vision cache)──▶ visual tokens over the pad positions
        ──prefill_b1_s{S}_c{C} × chunks──▶ first token ──decode_b1_c{C} × n──▶ tokens ──▶ text

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
from mindvl.runtime.detokenize import StreamDecoder
from mindvl.runtime.generation import Generation, Prompt
from mindvl.runtime.pool import KVPool
from mindvl.runtime.sampling import Sampling
from mindvl.runtime.vision_cache import VisionCache
from mindvl.shapes.buckets import TextChoice, choose_text_buckets
from mindvl.shapes.graphs import GraphSpec
from mindvl.shapes.processor import ImageInput, Prepared, Processor, VideoInput, Visual
from mindvl.shapes.prompt import user_turn
from mindvl.shapes.rope_index import rope_index
from mindvl.shapes.text_inputs import content_keys, visual_positions
from mindvl.shapes.vision_inputs import vision_rotary

# Defaults of the Python API (`mindvl serve` has flags): KV kept for prefix reuse, and visual tokens kept.
PREFIX_CACHE_MB, VISION_CACHE_MB = 1024, 256


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
    prompt_tokens_reused: int = 0  # a prefix the cache held already (prefix reuse)
    prompt_tokens_prefilled: int = 0  # the rest, run through the prefill graphs
    prefill_chunks: int = 0  # prefill graph calls: more than one when the prompt was prefilled in chunks
    vision_cache_hits: int = 0  # images and videos whose visual tokens came from the vision cache


class Runtime:
    def __init__(self, artifacts: Artifacts, device: str, prefix_cache_mb: float = PREFIX_CACHE_MB,
                 vision_cache_mb: float = VISION_CACHE_MB) -> None:
        if not prefix_cache_mb >= 0 or not vision_cache_mb >= 0:
            raise RequestError(f"prefix_cache_mb={prefix_cache_mb} and vision_cache_mb={vision_cache_mb} must be "
                               f">= 0 (0 turns the cache off)")
        self.artifacts, self.device = artifacts, device
        self.config = artifacts.config
        self.buckets = artifacts.buckets
        self.processor = Processor(artifacts.tokenizer_dir, self.buckets)
        self.pool = KVPool(artifacts, int(prefix_cache_mb * 2**20))
        self.vision_cache = VisionCache(int(vision_cache_mb * 2**20))

    @classmethod
    def load(cls, artifacts: str | Path, device: str | None = None, verify: bool = True,
             prefix_cache_mb: float = PREFIX_CACHE_MB, vision_cache_mb: float = VISION_CACHE_MB,
             fmt: str | None = None, provider: str = "CPU") -> Runtime:
        """Check and load an artifact folder; `verify=False` skips hashing the weights file (graph and tokenizer
        files are always checked). `prefix_cache_mb`: the ceiling on KV cache memory kept for prefix reuse (the
        cache sets of every bucket; 0 turns reuse off); `vision_cache_mb`: on visual tokens kept (0: none).
        `fmt`: the graphs to run, "mindir" (MindSpore) or "onnx" (onnxruntime, on `provider` "CPU" or "CUDA");
        default: the artifact's MindIR graphs when it has them, else its ONNX graphs."""
        device = select_device(device)
        loaded = Artifacts(artifacts, verify=verify, fmt=fmt, provider=provider)
        refuse_bfloat16_on_cpu(loaded.dtype, device)
        return cls(loaded, device, prefix_cache_mb, vision_cache_mb)

    def close(self) -> None:
        """Stop what the runtime started outside this process (a tensor-parallel artifact's workers; they stop at
        exit otherwise). The runtime cannot run graphs afterwards."""
        self.artifacts.close()

    def generate(self, prompt: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, keep_logits: bool = False) -> Output:
        """One user turn (images, then videos, then the text) through the chat template, answered."""
        return self.chat([user_turn(prompt, len(images), len(videos))], images, videos, max_new_tokens, temperature,
                         top_p, top_k, seed, keep_logits)

    def chat(self, messages: Sequence[dict], images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, keep_logits: bool = False) -> Output:
        """A whole conversation answered: `messages` as the chat template takes them (role and content, content a
        string or a list of {"type": "text", "text": ...}, {"type": "image"} and {"type": "video"} parts, which take
        `images` and `videos` in order). Each turn resends the history; what a cache still holds of it is reused."""
        out = Output()
        for _ in self._stream(out, messages, images, videos, max_new_tokens,
                              Sampling(temperature, top_p, top_k, seed), keep_logits):
            pass
        return out

    def stream(self, prompt: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, output: Output | None = None) -> Iterator[str]:
        """Text pieces as they are generated; pass `output` to also receive ids, buckets and timings."""
        yield from self._stream(output or Output(), [user_turn(prompt, len(images), len(videos))], images, videos,
                                max_new_tokens, Sampling(temperature, top_p, top_k, seed))

    def _stream(self, out: Output, messages: Sequence[dict], images: Sequence[ImageInput],
                videos: Sequence[VideoInput], max_new_tokens: int, sampling: Sampling,
                keep_logits: bool = False) -> Iterator[str]:
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens is {max_new_tokens}; ask for at least 1 token")
        start, loaded_before = time.perf_counter(), self.artifacts.graph_load_ms
        chosen: list[TextChoice] = []  # the text buckets, chosen once the prompt is counted and before decoding
        prepared = self.processor.prepare_chat(
            messages, images, videos,
            check_length=lambda n: chosen.append(choose_text_buckets(n, max_new_tokens, self.buckets)))
        out.timings["preprocess"] = (time.perf_counter() - start) * 1e3
        length, [text] = prepared.input_ids.shape[1], chosen
        keys = self.prompt_keys(prepared)
        # A larger cache than the rule's is worth taking when one of its sets holds a prefix of this prompt.
        capacities = [text.cache] + [c for c in self.buckets.cache if c > text.cache]
        batch = self.pool.batch(text.batch, capacities, [keys])
        reused = batch.reusable(keys)

        begin = time.perf_counter()
        encoded = self.encode(prepared, skip_before=reused, keys=keys)
        out.buckets = {"vision": encoded.vision_graphs}
        out.timings["vision"] = (time.perf_counter() - begin) * 1e3

        generation = self.new_generation(encoded, max_new_tokens, sampling, keep_logits)
        out.token_ids, out.logits, out.decode_steps_ms = generation.token_ids, generation.logits, generation.decode_ms
        batch.add(generation)
        try:
            while not generation.finish:
                for _, piece in batch.step():  # a batch of one: only this generation's results
                    if generation.error is not None:
                        raise generation.error
                    if piece:
                        yield piece
        finally:
            if not generation.finish:  # the caller stopped reading the stream: free the row for the next request
                batch.remove(generation)
        plan = choose_text_buckets(length, max_new_tokens, self.buckets, text.batch, batch.capacity, generation.start)
        out.text, out.prompt_tokens, out.vision_cache_hits = generation.text, length, encoded.vision_cache_hits
        out.prompt_tokens_reused, out.prompt_tokens_prefilled = generation.start, length - generation.start
        out.prefill_chunks = generation.chunks
        out.buckets.update(prefill=generation.prefill_graphs[-1], decode=batch.decode_graph,
                           prefill_padding_tokens=plan.padding_tokens,
                           inputs=[v.choice.describe() for v in prepared.visuals])
        out.timings["prefill"] = generation.prefill_ms
        out.timings["decode_per_token"] = median(generation.decode_ms) if generation.decode_ms else 0.0
        out.timings["graph_load"] = self.artifacts.graph_load_ms - loaded_before  # within vision and prefill
        out.timings["total"] = (time.perf_counter() - start) * 1e3

    def prompt_keys(self, prepared: Prepared) -> np.ndarray:
        """What each prompt position holds, images by their content (`shapes.text_inputs.content_keys`)."""
        ids = prepared.input_ids[0]
        return content_keys(ids, [(positions, visual.digest) for visual, positions in self._spans(prepared)])

    def encode(self, prepared: Prepared, skip_before: int = 0, keys: np.ndarray | None = None) -> Prompt:
        """Run the vision graphs and place their output: the prompt as the text graphs take it. Images and videos
        that lie wholly before `skip_before` (a prefix the cache holds) are not encoded. `keys`: the prompt's
        `prompt_keys`, when the caller has them already."""
        embeds, vision_graphs, hits = self._embed(prepared, skip_before)
        position_ids, rope_deltas = self._positions(prepared)
        keys = self.prompt_keys(prepared) if keys is None else keys
        return Prompt(embeds, position_ids[:, 0], int(rope_deltas[0, 0]), keys, vision_graphs, hits)

    def new_generation(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling,
                       keep_logits: bool = False) -> Generation:
        """A generation of `prompt` for a `Batch`: greedy or sampled, ending on the model's end tokens."""
        tokenizer = self.processor.tokenizer
        decoder = StreamDecoder(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        return Generation(prompt, max_new_tokens, sampling, decoder, frozenset(tokenizer.eos_token_ids), keep_logits)

    def vision_graph(self, visual: Visual) -> GraphSpec:
        """The vision or video graph of the bucket an image or video was fitted to."""
        b = visual.choice.bucket
        return self.artifacts.manifest.find("vision" if visual.kind == "image" else "video",
                                            frames=getattr(b, "frames", 1), height=b.height, width=b.width)

    def _spans(self, prepared: Prepared) -> list[tuple[Visual, np.ndarray]]:
        """Each image and video with the prompt positions of its pad tokens."""
        ids, merge = prepared.input_ids[0], self.config.vision.spatial_merge_size
        spans = []
        for kind, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            visuals = [x for x in prepared.visuals if x.kind == kind]
            counts = [int(np.prod(x.grid)) // merge**2 for x in visuals]
            spans += zip(visuals, visual_positions(ids, token_id, counts), strict=True)
        return spans

    def _embed(self, prepared: Prepared, skip_before: int) -> tuple[np.ndarray, list[str], int]:
        """Token embeddings [L, hidden] with each image's and video's visual tokens over its pad tokens, the vision
        graphs whose tokens were placed, and how many of those came from the vision cache."""
        v = self.config.vision
        embeds = self.artifacts.embed[prepared.input_ids[0]]  # a copy, in the host dtype already
        names, hits = [], 0
        for visual, positions in self._spans(prepared):
            if positions[-1] < skip_before:
                continue
            spec = self.vision_graph(visual)
            features = self.vision_cache.get(spec.name, visual.digest)
            if features is None:
                cos, sin = vision_rotary(visual.grid[None], v.head_dim, v.spatial_merge_size)
                features = self.artifacts.run(spec, {"patches": visual.pixels, "cos": cos, "sin": sin})
                self.vision_cache.put(spec.name, visual.digest, features)
            else:
                hits += 1
            embeds[positions] = features.astype(embeds.dtype, copy=False)
            names.append(spec.name)
        return embeds, names, hits

    def _positions(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return rope_index(prepared.input_ids, prepared.grid_thw("image"), prepared.grid_thw("video"),
                          image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                          vision_start_token_id=c.vision_start_token_id,
                          spatial_merge_size=c.vision.spatial_merge_size)
