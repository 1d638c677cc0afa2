"""`mindvl plan`: read the target (a model folder or an artifact folder) and the workload, plan, score the plan and
`--against` spec the same way, write the bucket YAML (whole or not at all) and return the report."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mindvl.errors import MindVLError
from mindvl.plan.cost import CostModel
from mindvl.plan.evaluate import Evaluation, evaluate
from mindvl.plan.planner import Budget, PlanError, graph_count, memory_bytes, plan
from mindvl.plan.workload import DEFAULT_MAX_TOKENS, PromptLengths, Request, batch_buckets, read_workload
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.config import ModelConfig, read_config
from mindvl.shapes.fit import FIDELITY_FLOOR
from mindvl.shapes.graphs import all_graphs, dtype_bytes
from mindvl.shapes.image import ProcessorConfig
from mindvl.shapes.manifest import MANIFEST, Manifest
from mindvl.shapes.weights import stored_weights


@dataclass(frozen=True)
class Target:
    """What is planned for: the model, its preprocessing, and, for an artifact folder, what its export measured."""

    cfg: ModelConfig
    proc: ProcessorConfig
    tokenizer_dir: Path
    dtype: str
    manifest: Manifest | None

    def weights_bytes(self, dtype: str) -> int:
        return sum(math.prod(w.shape) for w in stored_weights(self.cfg)) * dtype_bytes(dtype)


def read_target(path: str | Path) -> Target:
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = Manifest.read(path)
        folder = path / "tokenizer"
        return Target(manifest.config, ProcessorConfig.from_dir(folder), folder, manifest.dtype, manifest)
    return Target(read_config(path), ProcessorConfig.from_dir(path), path, "float32", None)


def run_plan(target: str | Path, workload: str | Path, output: str | Path, *, max_graphs: int = 12,
             max_memory_gb: float | None = None, floor: float = FIDELITY_FLOOR, against: str | Path | None = None,
             batch: tuple[int, ...] | None = None, prompt_tokens: str | None = None,
             max_tokens: int = DEFAULT_MAX_TOKENS, dtype: str | None = None) -> dict[str, Any]:
    """Plan the buckets of `target` for `workload`, write them to `output` (YAML) and return the report. `batch`:
    the batch buckets; by default those the workload's logged concurrency calls for (`batch_buckets`)."""
    if max_graphs < 1:
        raise PlanError(f"--max-graphs {max_graphs}: give a positive number of graphs")
    if max_memory_gb is not None and not max_memory_gb > 0:
        raise PlanError(f"--max-memory {max_memory_gb}: give the memory in GB the weights and caches may take, > 0")
    if not 0 <= floor <= 1:
        raise PlanError(f"--floor {floor}: give the share of an image's native tokens it must keep, from 0 to 1")
    t = read_target(target)
    dtype = dtype or t.dtype
    lengths = PromptLengths.parse(prompt_tokens) if prompt_tokens else None
    requests = read_workload(workload, t.tokenizer_dir, lengths, max_tokens)
    cost = CostModel(t.cfg)
    batch = batch or batch_buckets(requests)
    budget = Budget(max_graphs, None if max_memory_gb is None else int(max_memory_gb * 2**30),
                    t.weights_bytes(dtype), floor, tuple(sorted(set(batch))), dtype, dtype_bytes(dtype))
    planned = plan(requests, cost, t.proc, budget)
    plans = {"planned": planned}
    if against:
        plans["against"] = _against(against, floor)
    report = {
        "target": str(target), "workload": _describe(workload, requests), "floor": floor,
        "budget": {"max_graphs": max_graphs, "max_memory_gb": max_memory_gb, "batch": list(budget.batch),
                   "dtype": dtype},
        "plans": {name: _summary(spec, evaluate(spec, requests, cost, t.proc), t, cost, budget)
                  for name, spec in plans.items()},
    }
    write_spec(planned, Path(output), report)
    return report


def _against(path: str | Path, floor: float) -> BucketSpec:
    try:
        spec = BucketSpec.preset(str(path)) if str(path) in BucketSpec.preset_names() else BucketSpec.from_yaml(path)
    except MindVLError as e:
        raise PlanError(f"--against: {e}") from None
    # Scored under the same floor as the plan: the floor is the user's, not the old spec's.
    return replace(spec, fidelity_floor=floor)


def _describe(workload: str | Path, requests: list[Request]) -> dict[str, Any]:
    return {"source": str(workload), "requests": sum(r.weight for r in requests),
            "images": sum(r.weight * len(r.images) for r in requests),
            "videos": sum(r.weight * len(r.videos) for r in requests)}


def _summary(spec: BucketSpec, ev: Evaluation, t: Target, cost: CostModel, budget: Budget) -> dict[str, Any]:
    weights = t.weights_bytes(spec.dtype)
    kv = memory_bytes(spec, cost, 0, dtype_bytes(spec.dtype))
    inputs = {"images": sum(u.inputs for n, u in ev.buckets.items() if not n.startswith("video")),
              "videos": sum(u.inputs for n, u in ev.buckets.items() if n.startswith("video"))}
    buckets = []
    for name, use in sorted(ev.buckets.items(), key=lambda kv_: (kv_[0].startswith("video"), kv_[0])):
        total = inputs["videos" if name.startswith("video") else "images"]
        buckets.append({"bucket": name, "share": use.inputs / total if total else 0.0,
                        "waste_tokens_per_input": use.waste_tokens / use.inputs,
                        "lost_tokens_per_input": use.lost_tokens / use.inputs,
                        "below_floor": use.below_floor / use.inputs,
                        "aspect_distortion": use.stretch / use.inputs})
    served_inputs = inputs["images"] + inputs["videos"]
    disk, seconds = _measured(spec, t)
    return {
        "spec": spec.to_dict(), "graphs": graph_count(spec), "weights_bytes": weights, "kv_bytes": kv,
        "memory_bytes": weights + kv, "disk_bytes": None if disk is None else weights + disk,
        "export_s": seconds,
        "per_request": {"gflop": ev.per_request(ev.gflop), "off_native_gflop": ev.per_request(ev.off_native_gflop),
                        "prompt_tokens": ev.per_request(ev.prompt_tokens),
                        "visual_tokens": ev.per_request(ev.visual_tokens),
                        "waste_tokens": ev.per_request(ev.waste_tokens), "lost_tokens": ev.per_request(ev.lost_tokens),
                        "padding_tokens": ev.per_request(ev.padding_tokens)},
        "waste_tokens": ev.waste_tokens, "lost_tokens": ev.lost_tokens,
        "below_floor": ev.below_floor / served_inputs if served_inputs else 0.0,
        "refused": ev.refused / ev.requests if ev.requests else 0.0, "refusals": ev.refusals,
        "buckets": buckets,
    }


def _measured(spec: BucketSpec, t: Target) -> tuple[int | None, float | None]:
    """Graph bytes and export seconds predicted from what the target artifact's own export measured, per graph kind
    (linear in the graph's size: patches, or sequence length); None for a model folder, which measured nothing."""
    if t.manifest is None:
        return None, None
    measured = [(g, t.manifest.files.get(g.file, {})) for g in t.manifest.graphs]
    proposed = all_graphs(t.cfg, spec, spec.dtype)
    disk = seconds = 0.0
    for kind in {g.kind for g in proposed}:
        samples = [(_size(g), f["bytes"], f.get("export_s")) for g, f in measured if g.kind == kind and f]
        if not samples or any(s is None for *_, s in samples):
            return None, None
        sizes = [_size(g) for g in proposed if g.kind == kind]
        disk += sum(_linear([(x, b) for x, b, _ in samples], sizes))
        seconds += sum(_linear([(x, s) for x, _, s in samples], sizes))
    return int(disk), round(seconds, 1)


def _size(graph) -> int:
    b = graph.bucket
    return b.get("frames", 1) * b.get("height", 1) * b.get("width", 1) * b.get("seq", 1) * b.get("batch", 1)


def _linear(samples: list[tuple[int, float]], sizes: list[int]) -> list[float]:
    xs, ys = np.array([s[0] for s in samples], float), np.array([s[1] for s in samples], float)
    if len(set(xs)) < 2:
        return [float(ys.mean())] * len(sizes)
    slope, intercept = np.polyfit(xs, ys, 1)
    return [max(float(slope * x + intercept), float(ys.min()) / 2) for x in sizes]


def write_spec(spec: BucketSpec, path: Path, report: dict[str, Any]) -> None:
    """The plan as a bucket spec `mindvl export --buckets` takes as it is, written whole or not at all."""
    planned = report["plans"]["planned"]
    header = [f"# planned by `mindvl plan` for {report['workload']['source']} "
              f"({report['workload']['requests']:g} requests), floor {report['floor']}",
              f"# {planned['graphs']} graphs, memory {planned['memory_bytes'] / 2**30:.2f} GB (weights + KV caches), "
              f"{planned['per_request']['off_native_gflop']:.3g} GFLOP off native per request"]
    body = yaml.safe_dump({**spec.to_dict(), "fidelity_floor": spec.fidelity_floor}, sort_keys=False,
                          default_flow_style=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(header) + "\n" + body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
