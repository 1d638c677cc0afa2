"""manifest.json: what an artifact folder holds, written by export and checked by the runtime.

Everything the runtime needs to feed the graphs is here — model dimensions, bucket spec, each graph's inputs
and outputs, the weight groups in graph-input order — so it never guesses and never imports model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindvl.errors import ArtifactError
from mindvl.shapes.config import ModelConfig
from mindvl.shapes.graphs import FORMATS, GraphSpec
from mindvl.shapes.manifest_check import check_manifest

FORMAT = "mindvl-artifacts"
FORMAT_VERSION = 2  # 2: each weight's name, shape, dtype and split (shapes/weights.py), not its name alone
MANIFEST = "manifest.json"
MAX_BYTES = 1 << 26  # a manifest of thousands of graphs is a few MB: more is not one, and would not fit in memory


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    mindvl_version: str
    mindspore_version: str
    model: dict[str, Any]  # ModelConfig.to_dict()
    dtype: str
    buckets: dict[str, Any]  # BucketSpec.to_dict()
    graphs: tuple[GraphSpec, ...]
    weights: dict[str, Any]  # file, groups {name: [weight entries in input order]}, aliases, embed (an entry)
    files: dict[str, dict[str, Any]]  # relative path -> {sha256, bytes}, every file but the manifest

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.model)

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def tp(self) -> int:
        """The tensor-parallel degree the text graphs were exported for (1 when the spec has no `tp`)."""
        return self.buckets.get("tp", 1)

    @property
    def formats(self) -> list[str]:
        """The graph formats the artifact holds, in the order of FORMATS."""
        return [f for f in FORMATS if any(g.format == f for g in self.graphs)]

    def only(self, fmt: str) -> Manifest:
        """This manifest with the graphs of one format: what a runtime of that executor looks graphs up in."""
        if fmt not in self.formats:
            raise ArtifactError(f"this artifact has no {fmt} graphs (it has {', '.join(self.formats)}); re-export "
                                f"with --format {','.join([*self.formats, fmt])}, or run it as {self.formats[0]}")
        return dataclasses.replace(self, graphs=tuple(g for g in self.graphs if g.format == fmt))

    def find(self, kind: str, **bucket: int) -> GraphSpec:
        """The `kind` graph ("vision", "video", "prefill", "decode") exported at `bucket` (say batch=1, seq=64,
        cache=256), exactly as this manifest declares it: an artifact runs as it was exported, whatever the code
        that declares graphs makes of the same bucket today."""
        for g in self.graphs:
            if g.kind == kind and all(g.bucket.get(key) == value for key, value in bucket.items()):
                return g
        where = ", ".join(f"{key} {value}" for key, value in bucket.items())
        raise ArtifactError(f"{MANIFEST} declares no {kind} graph for {where}, which its buckets call for "
                            f"(tampered, or made by another mindvl); re-export the artifacts")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "mindvl_version": self.mindvl_version,
                "mindspore_version": self.mindspore_version, "dtype": self.dtype, "model": self.model,
                "buckets": self.buckets, "weights": self.weights, "graphs": [g.to_dict() for g in self.graphs],
                "files": self.files}

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{folder} has no {MANIFEST}: it is not a mindvl artifact folder, or its export did "
                                f"not finish; run `mindvl export MODEL_DIR -o {folder}`")
        if path.stat().st_size > MAX_BYTES:
            raise ArtifactError(f"{path} is {path.stat().st_size} bytes, more than any export writes (tampered or not "
                                f"a manifest); re-export the artifacts")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, a too long integer
            raise ArtifactError(f"{path} is corrupt ({e}); re-export the artifacts") from None
        if not isinstance(d, dict):
            raise ArtifactError(f"{path} holds {reprlib.repr(d)}, not a JSON object; re-export the artifacts")
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{path} is format {d.get('format')!r} version {d.get('format_version')!r}; this "
                                f"mindvl reads {FORMAT!r} version {FORMAT_VERSION}: re-export with this mindvl")
        check_manifest(d, path)
        return cls(d["mindvl_version"], d["mindspore_version"], d["model"], d["dtype"], d["buckets"],
                   tuple(GraphSpec.from_dict(g) for g in d["graphs"]), d["weights"], d["files"])

    def check_made_by(self, folder: Path, mindspore_version: str) -> None:
        """Refuse graphs made by another MindSpore major version (MindIR loads across minor versions)."""
        def major(version: str) -> int | None:
            head = version.split(".")[0]
            return int(head) if head.isdigit() else None

        made_with = self.mindspore_version
        if major(made_with) is None or major(made_with) != major(mindspore_version):
            raise ArtifactError(f"{folder} was exported with MindSpore {made_with}; this is MindSpore "
                                f"{mindspore_version}: re-export with this MindSpore")

    def check_file(self, folder: Path, relative: str, rehash: bool = True) -> Path:
        """The file's path once it is listed, inside `folder` (symbolic links followed), and its size and (with
        `rehash`) its sha256 match the manifest."""
        path, expected = folder / relative, self.files.get(relative)
        if expected is None:
            raise ArtifactError(f"{relative} is not listed in {folder / MANIFEST}, so it cannot be verified: the "
                                f"manifest is incomplete or tampered; re-export the artifacts")
        root, resolved = os.path.realpath(folder), os.path.realpath(path)
        if os.path.commonpath([root, resolved]) != root:
            raise ArtifactError(f"{relative} in {folder} leads to {resolved}, outside the artifact folder (a symbolic "
                                f"link out of it); re-export the artifacts")
        if not path.is_file():
            raise ArtifactError(f"{relative} is missing from {folder}: the artifact folder is incomplete; re-export it")
        if path.stat().st_size != expected["bytes"] or (rehash and file_sha256(path) != expected["sha256"]):
            raise ArtifactError(f"{relative} in {folder} does not match its sha256 in {MANIFEST} (corrupt or "
                                f"modified); re-export the artifacts")
        return path
