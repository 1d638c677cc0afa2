"""An exported artifact folder, checked and loaded: weights held once, graphs compiled on first use.

Checks at load: the manifest's format version, the MindSpore major version, every file's presence and size,
the sha256 of the weights and tokenizer files; each graph file's sha256 when it is first loaded.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from mindvl.device import host_dtype, to_tensor, zeros
from mindvl.errors import ArtifactError
from mindvl.shapes.graphs import GraphSpec, kv_cache_specs
from mindvl.shapes.manifest import MANIFEST, Manifest
from mindvl.tensorfile import read_safetensors

def load_graph(folder: Path, manifest: Manifest, spec: GraphSpec) -> nn.GraphCell:
    """One graph of an artifact folder, its file's hash checked, or an ArtifactError that says why not."""
    path = manifest.check_file(folder, spec.file)
    try:
        return nn.GraphCell(ms.load(str(path)))
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"{spec.file} cannot be loaded by MindSpore {ms.__version__} "
                            f"({' '.join(str(e).split())[:200]}); re-export the artifacts") from None


class Artifacts:
    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        if not self.folder.exists():
            left = sorted(self.folder.parent.glob(f".{glob.escape(self.folder.name)}.partial-*"))
            why = (f"an export into it did not finish (delete its leftover {left[0]})" if left else "check the path")
            raise ArtifactError(f"{self.folder} does not exist, so it has no {MANIFEST}: {why}; run "
                                f"`mindvl export MODEL_DIR -o {self.folder}`")
        if not self.folder.is_dir():
            raise ArtifactError(f"{self.folder} is not a folder; pass the folder `mindvl export -o` wrote")
        self.manifest = Manifest.read(self.folder)
        self.manifest.check_made_by(self.folder, ms.__version__)
        self.config = self.manifest.config
        self.dtype = self.manifest.dtype
        for relative in self.manifest.files:
            # Every file must be present at its size now (not halfway through a generation); the weights are
            # hashed as they are read, graph files when a graph is first loaded.
            self.manifest.check_file(self.folder, relative, rehash=relative.startswith("tokenizer/"))
        self._load_weights(verify)
        self._graphs: dict[str, nn.GraphCell] = {}
        self.graph_load_ms = 0.0  # time spent loading graphs so far, all of it on first use
        self._caches: dict[tuple[int, int], tuple[ms.Tensor, ...]] = {}

    def _load_weights(self, verify: bool) -> None:
        w = self.manifest.weights
        # Read into memory once, hashed in the same pass: device tensors and the host embedding table share it.
        sha256 = self.manifest.files[w["file"]]["sha256"] if verify else None
        arrays = read_safetensors(self.folder / w["file"], ArtifactError, "re-export the artifacts", mapped=False,
                                  sha256=sha256)
        arrays = {name: a.astype(host_dtype(self.dtype), copy=False) for name, a in arrays.items()}
        self.embed = arrays[w["embed"]]
        used = {w["aliases"].get(n, n) for names in w["groups"].values() for n in names}
        tensors = {name: to_tensor(a, self.dtype) for name, a in arrays.items() if name in used}
        try:
            self.weights = {group: tuple(tensors[w["aliases"].get(n, n)] for n in names)
                            for group, names in w["groups"].items()}
        except KeyError as e:
            raise ArtifactError(f"{w['file']} lacks tensor {e} that {MANIFEST} lists; re-export the artifacts") from None

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def graph(self, spec: GraphSpec) -> nn.GraphCell:
        """The compiled graph, loaded (and its file hash checked) the first time it is needed."""
        if spec.name not in self._graphs:
            start = time.perf_counter()
            self._graphs[spec.name] = load_graph(self.folder, self.manifest, spec)
            self.graph_load_ms += (time.perf_counter() - start) * 1e3
        return self._graphs[spec.name]

    def caches(self, batch: int, capacity: int) -> tuple[ms.Tensor, ...]:
        """The KV cache of one (batch, capacity), allocated once; every text graph of that size updates it."""
        key = (batch, capacity)
        if key not in self._caches:
            self._caches[key] = tuple(zeros(c.shape, c.dtype)
                                      for c in kv_cache_specs(self.config, batch, capacity, self.dtype))
        return self._caches[key]

    def run(self, spec: GraphSpec, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Feed one graph its data inputs (by name, as declared), its caches and its weights."""
        args = [to_tensor(inputs[t.name], t.dtype) for t in spec.inputs]
        if spec.caches:
            args += self.caches(spec.bucket["batch"], spec.bucket["cache"])
        return self.graph(spec)(*args, *self.weights[spec.weights]).asnumpy()
