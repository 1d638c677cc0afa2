"""One rank of a tensor-parallel artifact, in the process runtime/tp_worker.py started and connected.

Joins MindSpore's communication group (HCCL on Ascend, mccl on CPU), reads its slices of the weights from the one
weights file, tells the driver it is ready, then runs each graph the driver names on the inputs it sends, until it
is told to stop or the driver is gone. Rank 0 also runs the vision graphs, whole.
"""

from __future__ import annotations

import os
import resource
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import ops
from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank, init

from mindvl.device import host_dtype
from mindvl.errors import ArtifactError, MindVLError
from mindvl.runtime.artifacts import MindSporeGraphs, read_weights
from mindvl.shapes.manifest import MANIFEST, Manifest
from mindvl.shapes.parallel import rank_slice
from mindvl.shapes.weights import text_weights
from mindvl.tensorfile import read_slices

# The group MindSpore bakes into a collective exported without a communication context: HCCL's world group. On
# Ascend it is the world group; on the CPU backend (mccl) it is created over the same ranks.
EXPORTED_GROUP = "hccl_world_group"


def rank_weights(folder: Path, manifest: Manifest, rank: int) -> dict[str, np.ndarray]:
    """Rank `rank`'s slice of every text weight (and on rank 0 the vision weights, whole), each read from the one
    weights file on its own: the rank holds its slices and nothing more."""
    cfg, tp, w = manifest.config, manifest.tp, manifest.weights
    stored = read_weights(folder, manifest, mapped=True, widen=False)  # checks the header and shapes, reads no data
    index = {}
    for weight in text_weights(cfg.text, tp).weights():
        name = w["aliases"].get(weight.name, weight.name)  # a tied LM head is rows of the embedding table
        index[name] = rank_slice(stored[name].shape, weight.shape, rank, tp)
    if rank == 0:
        index.update({e["name"]: tuple(slice(0, n) for n in e["shape"]) for e in w["groups"]["vision"]})
    read = read_slices(folder / w["file"], index, ArtifactError, "re-export the artifacts")
    return {name: a.astype(host_dtype(manifest.dtype), copy=False) for name, a in read.items()}


def allreduce_ms(shape: tuple[int, ...], repeats: int) -> float:
    """Median milliseconds of one all-reduce of a float32 `shape` over every rank (all must call it together)."""
    reduce, x = ops.AllReduce(), ms.Tensor(np.ones(shape, np.float32))
    times = []
    for _ in range(repeats + 1):  # the first builds the kernel
        start = time.perf_counter()
        reduce(x).asnumpy()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[1:]))


def _serve(conn: Connection, manifest: Manifest, graphs: MindSporeGraphs, rank: int) -> None:
    calls, graph_ms = 0, 0.0
    while True:
        try:
            op, *args = conn.recv()
        except EOFError:
            return
        if op == "stop":
            conn.send(("ok", None))
            return
        try:
            if op == "run":
                name, fed, cache_set = args
                start = time.perf_counter()
                result: Any = graphs.run(manifest.graph(name), fed, cache_set)
                calls, graph_ms = calls + 1, graph_ms + (time.perf_counter() - start) * 1e3
            elif op == "load":
                graphs.graph(manifest.graph(args[0]))
                result = None
            elif op == "stats":
                result = {"rank": rank, "pid": os.getpid(), "calls": calls, "graph_ms": graph_ms,
                          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
            elif op == "allreduce":
                result = allreduce_ms(*args)
            else:
                raise ArtifactError(f"the driver asked for {op!r}, which this worker does not know: the driver and "
                                    f"the workers are different mindvl versions")
        except (MindVLError, KeyError) as e:
            conn.send(("error", str(e) if isinstance(e, MindVLError) else f"{MANIFEST} has no graph {e}"))
        else:
            conn.send(("ok", result))


def run_rank(conn: Connection, folder: str, device: str, scheduler: bool) -> int:
    if device == "Ascend":
        ms.set_device("Ascend", int(os.environ.get("DEVICE_ID", "0")))  # msrun numbers each node's cards
    else:
        ms.set_device("CPU")
    init()
    if scheduler:  # init() ran the rendezvous until the workers were done
        return 0
    rank, size = get_rank(), get_group_size()
    if GlobalComm.WORLD_COMM_GROUP != EXPORTED_GROUP:
        create_group(EXPORTED_GROUP, list(range(size)))
    try:
        manifest = Manifest.read(Path(folder)).only("mindir")
        if manifest.tp != size:
            raise ArtifactError(f"the artifact is exported for tp {manifest.tp} and msrun started {size} workers")
        groups = ("text", "vision") if rank == 0 else ("text",)
        graphs = MindSporeGraphs(Path(folder), manifest, rank_weights(Path(folder), manifest, rank), groups)
    except MindVLError as e:
        conn.send(("error", rank, str(e)))
        return 1
    conn.send(("ready", rank, os.getpid()))
    _serve(conn, manifest, graphs, rank)
    return 0
