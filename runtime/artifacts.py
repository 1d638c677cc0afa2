"""An exported artifact folder, checked and loaded: weights held once, graphs compiled on first use.

Checks at load: the manifest's format version and structure, the MindSpore major version, that the largest KV
cache fits this machine's memory, every file's presence inside the folder and size, the sha256 of the weights and
tokenizer files, the manifest's weights against those its model config declares, the weights file's header and
tensors; each graph file's sha256 when it is first loaded.
"""

from __future__ import annotations

import glob
import math
import os
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn

from mindvl.device import host_dtype, to_tensor, zeros
from mindvl.errors import ArtifactError
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.graphs import GraphSpec, TensorSpec, dtype_bytes, kv_cache_shape
from mindvl.shapes.image import one_line
from mindvl.shapes.manifest import MANIFEST, Manifest
from mindvl.shapes.weights import manifest_weights, stored_weights
from mindvl.tensorfile import read_safetensors, read_slices


def check_cache_memory(manifest: Manifest) -> None:
    """Refuse buckets whose KV cache could never be allocated on this machine, before anything is allocated."""
    cfg, buckets = manifest.config, manifest.buckets
    batch, capacity = max(buckets["batch"]), max(buckets["cache"])
    # From the shape, not the specs: a tampered layer count could make those billions of tensors. Every rank of a
    # tensor-parallel artifact runs on this machine.
    need = (2 * cfg.text.num_hidden_layers * math.prod(kv_cache_shape(cfg, batch, capacity, manifest.tp))
            * dtype_bytes(manifest.dtype) * manifest.tp)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > memory:
        raise ArtifactError(f"the KV cache of bucket batch {batch} × cache {capacity} needs {need} bytes "
                            f"({need >> 30} GiB), more than this machine's {memory >> 30} GiB of memory; re-export "
                            f"with smaller cache or batch buckets, or run on a larger machine")


def graph_weights(weights: dict[str, Any]) -> set[str]:
    """The tensors the graphs take, aliases resolved, of a manifest's `weights`."""
    return {weights["aliases"].get(e["name"], e["name"]) for group in weights["groups"].values() for e in group}


def _show(entry: dict[str, Any] | None) -> str:
    return "no weight" if entry is None else f"{entry['name']!r} {entry['shape']} {entry['dtype']} {entry['split']}"


def check_declared_weights(manifest: Manifest) -> None:
    """Refuse weights that are not, entry for entry, what the manifest's model config declares (shapes/weights.py):
    graphs find their weights by position, so two same-shaped weights swapped would silently make another model."""
    declared, found = manifest_weights(manifest.config, manifest.dtype), manifest.weights
    pairs = [("weights.embed", declared["embed"], found["embed"])]
    for group in dict.fromkeys([*declared["groups"], *found["groups"]]):
        entries = zip_longest(declared["groups"].get(group, []), found["groups"].get(group, []))
        pairs += [(f"weights.groups.{group}[{i}]", *pair) for i, pair in enumerate(entries)]
    # At tp 1 every weight is read whole and its split is moot (artifacts made before tensor parallelism declare the
    # LM head replicated).
    compared = (lambda e: e and {**e, "split": None}) if manifest.tp == 1 else (lambda e: e)
    for where, want, have in pairs:
        if compared(want) != compared(have):
            raise ArtifactError(f"{MANIFEST}: {where} holds {_show(have)}, but the model config declares "
                                f"{_show(want)}; re-export the artifacts")
    if found["aliases"] != declared["aliases"]:
        raise ArtifactError(f"{MANIFEST}: weights.aliases is {found['aliases']}, but the model config declares "
                            f"{declared['aliases']}; re-export the artifacts")


def read_weights(folder: Path, manifest: Manifest, mapped: bool, sha256: str | None = None,
                 widen: bool = True) -> dict[str, np.ndarray]:
    """The weights file's tensors (see `read_safetensors`), once the manifest's weights are the declared ones and
    the file holds each at its declared shape."""
    check_declared_weights(manifest)
    path = folder / manifest.weights["file"]
    arrays = read_safetensors(path, ArtifactError, "re-export the artifacts", mapped=mapped, sha256=sha256,
                              widen=widen)
    for weight in stored_weights(manifest.config):
        if weight.name not in arrays:
            raise ArtifactError(f"{path} has no float tensor {weight.name!r}, which {MANIFEST} lists (missing, or of "
                                f"a dtype mindvl does not read); re-export the artifacts")
        if arrays[weight.name].shape != weight.shape:
            raise ArtifactError(f"{path}: tensor {weight.name!r} is {list(arrays[weight.name].shape)}, not "
                                f"{list(weight.shape)} as {MANIFEST} declares; re-export the artifacts")
    return arrays


def load_graph(folder: Path, manifest: Manifest, spec: GraphSpec) -> nn.GraphCell:
    """One graph of an artifact folder, its file's hash checked, or an ArtifactError that says why not."""
    path = manifest.check_file(folder, spec.file)
    try:
        return nn.GraphCell(ms.load(str(path)))
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"{spec.file} cannot be loaded by MindSpore {ms.__version__} ({one_line(e)[:200]}); "
                            f"re-export the artifacts") from None


def _fed(spec: GraphSpec, declared: TensorSpec, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The array the runtime feeds as one declared input, once it has the declared shape."""
    if declared.name not in inputs:
        raise ArtifactError(f"{spec.file} takes an input {declared.name!r} ({MANIFEST}) that this mindvl does not "
                            f"feed: the artifact was made by another mindvl; re-export it")
    array = inputs[declared.name]
    if array.shape != declared.shape:
        raise ArtifactError(f"{spec.file} takes {declared.name} as {list(declared.shape)} ({MANIFEST}), and this "
                            f"mindvl feeds {list(array.shape)} for its bucket: the manifest disagrees with the graph's "
                            f"bucket or the model config; re-export the artifacts")
    return array


class Artifacts:
    def __init__(self, folder: str | Path, verify: bool = True, fmt: str | None = None, provider: str = "CPU") -> None:
        """`fmt`: which of the artifact's graph formats to run (default: MindIR when it has both); `provider`: the
        onnxruntime execution provider for ONNX graphs ("CPU" or "CUDA")."""
        self.folder = Path(folder)
        if not self.folder.exists():
            left = sorted(self.folder.parent.glob(f".{glob.escape(self.folder.name)}.partial-*"))
            why = (f"an export into it did not finish (delete its leftover {left[0]})" if left else "check the path")
            raise ArtifactError(f"{self.folder} does not exist, so it has no {MANIFEST}: {why}; run "
                                f"`mindvl export MODEL_DIR -o {self.folder}`")
        if not self.folder.is_dir():
            raise ArtifactError(f"{self.folder} is not a folder; pass the folder `mindvl export -o` wrote")
        manifest = Manifest.read(self.folder)
        self.format = fmt or manifest.formats[0]
        self.manifest = manifest.only(self.format)
        if self.format == "mindir":
            self.manifest.check_made_by(self.folder, ms.__version__)
        check_cache_memory(self.manifest)
        self.config = self.manifest.config
        self.dtype = self.manifest.dtype
        self.buckets = BucketSpec.from_dict(self.manifest.buckets)
        for relative in self.manifest.files:
            # Every file must be present at its size now (not halfway through a generation); the weights are
            # hashed as they are read, graph files when a graph is first loaded.
            self.manifest.check_file(self.folder, relative, rehash=relative.startswith("tokenizer/"))
        # The processor reads tokenizer files by name: one added after export (a chat template, say) would be read
        # unverified.
        unlisted = sorted(str(p.relative_to(self.folder)) for p in self.tokenizer_dir.rglob("*")
                          if not p.is_dir() and str(p.relative_to(self.folder)) not in self.manifest.files)
        if unlisted:
            raise ArtifactError(f"{unlisted[0]} in {self.folder} is not listed in {MANIFEST}, so it would be read "
                                f"unverified; remove it, or re-export the artifacts")
        if self.manifest.tp > 1:
            from mindvl.runtime.tensor_parallel import TensorParallelGraphs

            self.embed = self._read_embed(verify)
            self.executor = TensorParallelGraphs(self.folder, self.manifest)
        elif self.format == "onnx":
            from mindvl.runtime.onnx_graphs import OnnxGraphs

            self.executor = OnnxGraphs(self.folder, self.manifest, self._load_weights(verify), provider)
        else:
            self.executor = MindSporeGraphs(self.folder, self.manifest, self._load_weights(verify))
        self.graph_load_ms = 0.0  # time spent loading graphs so far, all of it on first use
        self._loaded: set[str] = set()

    def _load_weights(self, verify: bool) -> dict[str, np.ndarray]:
        """The weights the graphs take, by name, in the host dtype; the embedding table is kept for the host."""
        w = self.manifest.weights
        # Read into memory once, hashed in the same pass: the executor's tensors and the host table share it.
        sha256 = self.manifest.files[w["file"]]["sha256"] if verify else None
        arrays = read_weights(self.folder, self.manifest, mapped=False, sha256=sha256)
        arrays = {name: a.astype(host_dtype(self.dtype), copy=False) for name, a in arrays.items()}
        self.embed = arrays[w["embed"]["name"]]
        used = graph_weights(w)
        return {name: a for name, a in arrays.items() if name in used}

    def _read_embed(self, verify: bool) -> np.ndarray:
        """A tensor-parallel driver's only weight, the embedding table: the workers read their own slices."""
        w = self.manifest.weights
        self.manifest.check_file(self.folder, w["file"], rehash=verify)  # hashed as a stream, never held
        name = w["embed"]["name"]
        shape = read_weights(self.folder, self.manifest, mapped=True, widen=False)[name].shape  # checked, not read
        table = read_slices(self.folder / w["file"], {name: tuple(slice(0, n) for n in shape)}, ArtifactError,
                            "re-export the artifacts")[name]
        return table.astype(host_dtype(self.dtype), copy=False)

    def close(self) -> None:
        """Release what the executor holds beyond memory: a tensor-parallel artifact's workers."""
        if hasattr(self.executor, "close"):
            self.executor.close()

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def graph(self, spec: GraphSpec) -> Any:
        """The compiled graph, loaded (and its file hash checked) the first time it is needed."""
        if spec.name not in self._loaded:
            start = time.perf_counter()
            self.executor.graph(spec)
            self._loaded.add(spec.name)
            self.graph_load_ms += (time.perf_counter() - start) * 1e3
        return self.executor.graph(spec)

    def caches(self, spec: GraphSpec, cache_set: int = 0) -> tuple[Any, ...]:
        """The KV cache tensors a text graph updates (one set per bucket and cache set; see `CacheSets`)."""
        return self.executor.caches(spec, cache_set)

    def run(self, spec: GraphSpec, inputs: dict[str, np.ndarray], cache_set: int = 0) -> np.ndarray:
        """Feed one graph, as the manifest declares it, its data inputs (by name), its caches and its weights."""
        fed = [_fed(spec, t, inputs) for t in spec.inputs]
        self.graph(spec)
        return self.executor.run(spec, fed, cache_set)


class MindSporeGraphs:
    """MindIR graphs through `nn.GraphCell`: weights as device tensors, each KV cache a set of tensors that every
    text graph of its (batch, cache) bucket updates in place."""

    def __init__(self, folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray],
                 groups: Sequence[str] | None = None) -> None:
        """`arrays`: the weights by name (aliases resolved) of `groups`, the weight groups to run (default: all)."""
        self.folder, self.manifest = folder, manifest
        w = manifest.weights
        tensors = {name: to_tensor(a, manifest.dtype) for name, a in arrays.items()}
        self.weights = {group: tuple(tensors[w["aliases"].get(e["name"], e["name"])] for e in w["groups"][group])
                        for group in (w["groups"] if groups is None else groups)}
        self._graphs: dict[str, nn.GraphCell] = {}
        self._caches = CacheSets(lambda c: zeros(c.shape, c.dtype))

    def graph(self, spec: GraphSpec) -> nn.GraphCell:
        if spec.name not in self._graphs:
            self._graphs[spec.name] = load_graph(self.folder, self.manifest, spec)
        return self._graphs[spec.name]

    def caches(self, spec: GraphSpec, cache_set: int) -> tuple[ms.Tensor, ...]:
        return self._caches.get(spec, cache_set)

    def run(self, spec: GraphSpec, fed: list[np.ndarray], cache_set: int) -> np.ndarray:
        args = [to_tensor(a, t.dtype) for a, t in zip(fed, spec.inputs, strict=True)]
        args += self.caches(spec, cache_set)
        try:
            return self.graph(spec)(*args, *self.weights[spec.weights]).asnumpy()
        except (RuntimeError, TypeError, ValueError) as e:  # the graph file was verified, the manifest cannot be
            raise ArtifactError(f"{spec.file} refuses the inputs {MANIFEST} makes for it ({one_line(e)[:120]}): "
                                f"its model config or weight groups may not match the graph; re-export the "
                                f"artifacts") from None


class CacheSets:
    """KV caches as the text graphs declare them, allocated once per (batch, cache) bucket and cache set (`make`
    allocates one tensor): every text graph of that size updates the same tensors in place. More than one set of a
    bucket keeps several conversations' prefixes (`runtime/pool.py`)."""

    def __init__(self, make: Callable[[TensorSpec], Any]) -> None:
        self.make = make
        self._sets: dict[tuple[int, int, int], tuple[tuple[TensorSpec, ...], tuple[Any, ...]]] = {}

    def get(self, spec: GraphSpec, cache_set: int) -> tuple[Any, ...]:
        if not spec.caches:
            return ()
        key = (spec.bucket["batch"], spec.bucket["cache"], cache_set)
        if key not in self._sets:
            self._sets[key] = (spec.caches, tuple(self.make(c) for c in spec.caches))
        declared, tensors = self._sets[key]
        if declared != spec.caches:
            raise ArtifactError(f"{spec.file} declares other KV cache inputs in {MANIFEST} than the other graphs of "
                                f"batch {key[0]} × cache {key[1]}, which share one cache; re-export the artifacts")
        return tensors
