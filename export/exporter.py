"""`mindvl export`: one graph per bucket (MindIR, ONNX or both), one copy of the weights, the tokenizer files, a
manifest.

Graphs take their weights (and the KV cache) as inputs, so every graph file holds only the computation and the
weights exist once on disk (weights.safetensors) and once in the runtime's memory. The folder is assembled
under a hidden temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import mindspore as ms

from mindvl import __version__
from mindvl.device import to_tensor, zeros
from mindvl.errors import ArtifactError, ExportError
from mindvl.qwen2vl.text import TextStep
from mindvl.qwen2vl.vision import VisionEncoder
from mindvl.qwen2vl.weights import load_weights
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.config import ModelConfig, read_config
from mindvl.shapes.graphs import FORMATS, GraphSpec, all_graphs
from mindvl.shapes.manifest import MANIFEST, Manifest, file_sha256
from mindvl.shapes.parallel import ParallelError
from mindvl.shapes.weights import Weight, aliases, manifest_weights, stored_weights, text_weights, weight_groups
from mindvl.tensorfile import write_safetensors

# Files of the model folder the runtime's preprocessing and detokenisation read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
REQUIRED_FILES = ("tokenizer.json", "preprocessor_config.json")


def _export_graph(cfg: ModelConfig, graph: GraphSpec, weights: dict[str, tuple[ms.Tensor, ...]], folder: Path,
                  tp: int) -> None:
    if graph.format == "onnx":
        _export_onnx(cfg, graph, folder)
        return
    if graph.weights == "vision":
        cell = VisionEncoder(cfg.vision, graph.bucket["groups"])
    else:
        cell = TextStep(cfg.text, graph.bucket["batch"], graph.bucket["cache"], tp)
    inputs = [zeros(t.shape, t.dtype) for t in graph.inputs + graph.caches]  # export needs shapes and dtypes only
    ms.export(cell, *inputs, *weights[graph.weights], file_name=str(folder / graph.file.removesuffix(".mindir")),
              file_format="MINDIR")


def _export_onnx(cfg: ModelConfig, graph: GraphSpec, folder: Path) -> None:
    """The graph built op by op (export/onnx_graphs.py), checked by onnx's own full check before it is written."""
    onnx, onnx_graph = onnx_modules()
    model = onnx_graph(cfg, graph, weight_groups(cfg)[graph.weights])
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug of the builder, not of the user's input
        raise ExportError(f"{graph.name}: the ONNX graph fails onnx's check ({str(e).splitlines()[0]}); export "
                          f"--format mindir, and report this") from None
    onnx.save(model, str(folder / graph.file))


def onnx_modules() -> tuple:
    """onnx and the graph builder, or an ExportError saying how to install them (they are an optional extra)."""
    try:
        import onnx

        from mindvl.export.onnx_graphs import onnx_graph
    except ImportError as e:
        raise ExportError(f"--format onnx needs the onnx package ({e.name} is missing): pip install "
                          f"\"mindvl[onnx]\"") from None
    return onnx, onnx_graph


def _checked(declared: Weight, tensor: ms.Tensor, dtype: str) -> ms.Tensor:
    """`tensor`, once it is what the manifest will say the graphs take in its place."""
    shape, found = tuple(tensor.shape), str(tensor.dtype).lower()
    if (shape, found) != (declared.shape, dtype):
        raise ExportError(f"weight {declared.name} is {list(shape)} {found}, but the model config declares "
                          f"{list(declared.shape)} {dtype}; check that the checkpoint matches its config.json")
    return tensor


def _formats(formats: Sequence[str], dtype: str, tp: int) -> tuple[str, ...]:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"--format {','.join(formats)}: give one or more of {', '.join(FORMATS)}, comma-separated "
                          f"(e.g. mindir,onnx)")
    if "onnx" in formats and tp > 1:
        raise ExportError(f"--format onnx with tp {tp}: tensor-parallel graphs are MindIR only (their all-reduce is "
                          f"MindSpore's); export --format mindir, or tp 1 for ONNX")
    if "onnx" in formats:
        if dtype != "float32":
            raise ExportError(f"--format onnx writes float32 graphs, and the export's dtype is {dtype}: add --dtype "
                              f"float32, or export {dtype} as --format mindir")
        onnx_modules()
    return tuple(dict.fromkeys(formats))


def _check_target(out: Path, model_dir: Path, force: bool) -> None:
    """Refuse a target whose replacement would delete what is not ours: only an empty folder, or with `force` a
    folder holding a manifest this mindvl reads, may be replaced; never a link, the model or a folder holding it."""
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link: export replaces folders, never links or what they point to; "
                          f"choose another -o folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: choose another -o folder")
    model, target = model_dir.resolve(), out.resolve()
    if target == model or target in model.parents:
        what = "is the model folder" if target == model else f"holds the model folder {model_dir}"
        raise ExportError(f"{out} {what}: export would replace it; choose another -o folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"{out} is not empty: pass --force to replace it, or choose another -o folder")
    try:
        Manifest.read(out)
    except ArtifactError:
        raise ExportError(f"{out} holds no {MANIFEST} this mindvl can read: --force only replaces mindvl artifact "
                          f"folders; choose another -o folder or empty it yourself") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # alive but another user's, or too large to be a pid: leave it alone
        pass
    return True


def _remove_dead_partials(out: Path) -> None:
    """Delete the temporary folders that exports into `out` left when they were killed: their process is gone, or
    is this one (a dead export had our pid). Only real folders named exactly like ours, never through a link."""
    ours = re.compile(rf"\.{re.escape(out.name)}\.partial-(\d+)")
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        match = ours.fullmatch(leftover.name)
        if match and leftover.is_dir() and not leftover.is_symlink() \
                and (int(match[1]) == os.getpid() or not _alive(int(match[1]))):
            shutil.rmtree(leftover, ignore_errors=True)


def _set_file_modes(folder: Path, like: Path) -> None:
    """Give every file the mode of `like`, a file this process created, i.e. what the umask gives a new file:
    MindSpore writes graphs owner read-only (0400), which would keep a service account from serving an export
    another account made. (Folders were created here, so the umask already set theirs.)"""
    mode = stat.S_IMODE(like.stat().st_mode)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _place(tmp: Path, out: Path, model_dir: Path, force: bool) -> None:
    """Swap the finished folder into place; a replaced export is removed only after the swap, and put back if the
    swap fails."""
    _check_target(out, model_dir, force)  # again: the export took a while, and the target may have changed
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        os.rename(old, out)
        raise ExportError(f"cannot move the new export into {out} ({e.strerror}), so it was left as it was; check "
                          f"that {out.parent} is writable and export again") from None
    try:
        shutil.rmtree(old)
    except OSError as e:
        raise ExportError(f"exported to {out}, but the folder it replaced, now {old}, could not be deleted "
                          f"({e.strerror}); delete it yourself") from None


def export_artifacts(model_dir: str | Path, out_dir: str | Path, buckets: BucketSpec, dtype: str | None = None,
                     force: bool = False, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                     formats: Sequence[str] = ("mindir",)) -> Manifest:
    """Export every graph `buckets` calls for, in each of `formats` (FORMATS); returns the manifest written into
    `out_dir`."""
    model_dir, out = Path(model_dir), Path(out_dir)
    dtype = dtype or buckets.dtype
    formats = _formats(formats, dtype, buckets.tp)
    _check_target(out, model_dir, force)
    for name in REQUIRED_FILES:
        if not (model_dir / name).is_file():
            raise ExportError(f"{model_dir / name} is missing: the runtime needs it for preprocessing; copy it from "
                              f"the original checkpoint")
    cfg = read_config(model_dir)
    try:
        rank_text_weights = text_weights(cfg.text, buckets.tp)
    except ParallelError as e:
        raise ExportError(f"{model_dir}: {e}") from None
    start = time.perf_counter()
    arrays = load_weights(model_dir, cfg)
    groups, tied = weight_groups(cfg), aliases(cfg.text)
    # Device tensors only for what a graph takes (an untied embedding table stays host-side, as in the runtime).
    used = {tied.get(w.name, w.name) for group in groups.values() for w in group}
    tensors = {name: to_tensor(arrays[name], dtype) for name in used}
    weights = {name: tuple(_checked(w, tensors[tied.get(w.name, w.name)], dtype) for w in group)
               for name, group in groups.items()}
    if buckets.tp > 1:  # the text graphs take one rank's slices, of which export needs the shapes only
        weights["text"] = tuple(zeros(w.shape, dtype) for w in rank_text_weights.weights())
    log(f"loaded {len(arrays)} tensors from {model_dir} in {time.perf_counter() - start:.1f} s")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove_dead_partials(out)
    try:
        tmp.mkdir()
        (tmp / "graphs").mkdir()
        (tmp / "tokenizer").mkdir()
        weights_sha256 = write_safetensors(tmp / "weights.safetensors",
                                           {w.name: arrays[w.name] for w in stored_weights(cfg)}, dtype)
        graphs = all_graphs(cfg, buckets, dtype, formats)
        seconds = {}  # per graph file: `mindvl plan` predicts the export time of the buckets it proposes from these
        for i, graph in enumerate(graphs, 1):
            begin = time.perf_counter()
            _export_graph(cfg, graph, weights, tmp, buckets.tp)
            seconds[graph.file] = round(time.perf_counter() - begin, 3)
            log(f"[{i:>3}/{len(graphs)}] {graph.name:<28} {seconds[graph.file]:6.2f} s "
                f"{(tmp / graph.file).stat().st_size / 1024:8.1f} KB")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / "tokenizer" / name)
        # The weights were hashed as they were written; the rest is small.
        files = {str(p.relative_to(tmp)): {"sha256": weights_sha256 if p.name == "weights.safetensors"
                                           else file_sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        for file, spent in seconds.items():
            files[file]["export_s"] = spent
        manifest = Manifest(
            mindvl_version=__version__, mindspore_version=ms.__version__, model=cfg.to_dict(), dtype=dtype,
            buckets={**buckets.to_dict(), "dtype": dtype}, graphs=tuple(graphs),
            weights={"file": "weights.safetensors", **manifest_weights(cfg, dtype)},
            files=files)
        manifest.write(tmp)
        _set_file_modes(tmp, tmp / "weights.safetensors")
        _place(tmp, out, model_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {len(graphs)} graphs to {out} in {time.perf_counter() - start:.1f} s")
    return manifest
