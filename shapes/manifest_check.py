"""manifest.json's structure, checked once when it is read, so a tampered or hand-edited manifest is one
ArtifactError naming the bad key by its JSON path (`graphs[3].inputs[0].shape[1]`) instead of a traceback later.

Checked: every key the runtime and `inspect` read is present with its type; every file name is a relative path
that stays inside the artifact folder; the graph and weight files are listed in `files`, so they are never read
unverified; the buckets and the model config are valid. Plain Python: the runtime imports no schema library.
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from mindvl.errors import ArtifactError, MindVLError
from mindvl.shapes.buckets import DTYPES, BucketSpec
from mindvl.shapes.config import ModelConfig, TextConfig, VisionConfig
from mindvl.shapes.graphs import FORMATS, GraphSpec
from mindvl.shapes.parallel import text_shard
from mindvl.shapes.weights import SPLITS


@dataclass(frozen=True)
class Is:
    """A leaf of the schema: `test` accepts the value, `expected` says what it accepts."""

    expected: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class Each:
    """An object whose every value matches `value`, and every key `key` (when given)."""

    value: Any
    key: Is | None = None


class _Invalid(Exception):
    pass


def _integer(low: int) -> Is:
    return Is(f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)


def _one_of(*choices: str) -> Is:
    return Is(" or ".join(map(repr, choices)), lambda v: isinstance(v, str) and v in choices)


def _inside(name: Any) -> bool:
    """A relative path that cannot climb out of the folder it is joined to (links are checked on disk, at use)."""
    if not isinstance(name, str) or name in ("", ".") or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


TEXT = Is("a string", lambda v: isinstance(v, str))
COUNT, POSITIVE = _integer(0), _integer(1)
NUMBER = Is("a positive number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf)
FLAG = Is("true or false", lambda v: isinstance(v, bool))
OBJECT = Is("an object", lambda v: isinstance(v, dict))
SHA256 = Is("64 lowercase hex digits", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None)
PATH = Is("a relative path inside the artifact folder", _inside)

# ModelConfig.to_dict(): the dataclass fields by their annotated type; token ids may be 0, sizes may not.
_LEAF = {"int": POSITIVE, "float": NUMBER, "bool": FLAG, "str": TEXT}
_ROPE = ("mrope_section", "rope_theta")  # TextConfig fields that to_dict() nests under rope_parameters
_MROPE = Is("a list of 3 integers >= 1", lambda v: isinstance(v, list) and len(v) == 3 and all(map(POSITIVE.test, v)))
MODEL = {
    "model_type": _one_of("qwen2_vl"),
    "text_config": {**{f.name: _LEAF[f.type] for f in fields(TextConfig) if f.name not in _ROPE},
                    "rope_parameters": {"mrope_section": _MROPE, "rope_theta": NUMBER}},
    "vision_config": {f.name: _LEAF[f.type] for f in fields(VisionConfig)},
    **{f.name: COUNT for f in fields(ModelConfig) if f.type == "int"},
}
TENSOR = {"name": TEXT, "shape": [COUNT], "dtype": _one_of(*DTYPES, "int32")}
WEIGHT = {"name": TEXT, "shape": [COUNT], "dtype": _one_of(*DTYPES), "split": _one_of(*SPLITS)}  # Weight.to_dict
GRAPH = {"name": TEXT, "kind": _one_of("vision", "video", "prefill", "decode"), "file": PATH, "bucket": Each(POSITIVE),
         "inputs": [TENSOR], "caches": [TENSOR], "weights": TEXT, "outputs": [TENSOR]}
MANIFEST = {
    "mindvl_version": TEXT, "mindspore_version": TEXT, "dtype": _one_of(*DTYPES), "model": MODEL, "buckets": OBJECT,
    "weights": {"file": PATH, "groups": Each([WEIGHT]), "aliases": Each(TEXT), "embed": WEIGHT},
    "graphs": [GRAPH],
    "files": Each({"sha256": SHA256, "bytes": COUNT}, key=PATH),
}


def _show(value: Any) -> str:
    return {dict: "an object", list: "a list"}.get(type(value)) or reprlib.repr(value)


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, Is):
        if not schema.test(value):
            raise _Invalid(f"{where} is {_show(value)}, not {schema.expected}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise _Invalid(f"{where} is {_show(value)}, not a list")
        for i, item in enumerate(value):
            _check(item, schema[0], f"{where}[{i}]")
    else:
        if not isinstance(value, dict):
            raise _Invalid(f"{where} is {_show(value)}, not an object")
        if isinstance(schema, Each):
            for key, item in value.items():
                if schema.key:
                    _check(key, schema.key, f"a key of {where}")
                _check(item, schema.value, f"{where}[{key!r}]")
        else:
            for key, item_schema in schema.items():
                if key not in value:
                    raise _Invalid(f"{_at(where, key)} is missing")
                _check(value[key], item_schema, _at(where, key))


def _check_consistent(d: dict[str, Any]) -> None:
    """What the types alone do not say: the files read are listed, the buckets and the model config are valid."""
    try:
        spec = BucketSpec.from_dict(d["buckets"])
    except MindVLError as e:
        raise _Invalid(f"buckets are invalid ({e})") from None
    try:
        text_shard(ModelConfig.from_hf(d["model"]).text, spec.tp)
    except MindVLError as e:
        raise _Invalid(f"model is invalid ({e})") from None
    w, files = d["weights"], d["files"]
    read = [("weights.file", w["file"])]
    for i, g in enumerate(d["graphs"]):
        where = f"graphs[{i}]"
        if g.get("format", "mindir") not in FORMATS:  # absent in manifests written before ONNX: MindIR
            raise _Invalid(f"{where}.format is {_show(g['format'])}, not one of {', '.join(FORMATS)}")
        derived = GraphSpec.from_dict(g).file
        if g["file"] != derived:
            raise _Invalid(f"{where} is named {g['name']!r} but its file is {g['file']!r}, not {derived!r}")
        if g["weights"] not in w["groups"]:
            raise _Invalid(f"{where}.weights is {g['weights']!r}, which is not a group of weights.groups")
        read.append((f"{where}.file", derived))
    for where, name in read:
        if name not in files:
            raise _Invalid(f"{where} {name!r} is not listed in files with its sha256, so it would be read unverified")


def check_manifest(d: Any, path: Path) -> None:
    """Raise an ArtifactError naming the first key of `d` (manifest.json's content) that is missing or wrong."""
    try:
        _check(d, MANIFEST, "")
        _check_consistent(d)
    except _Invalid as e:
        raise ArtifactError(f"{path}: {e}; re-export the artifacts") from None
