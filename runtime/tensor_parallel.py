"""The driver of a tensor-parallel artifact: msrun starts its `tp` workers, and each graph call goes to them.

The driver is the process the user started (`mindvl generate`, `mindvl serve`, `Runtime.load`): it keeps the
tokenizer, the host-side embedding table, preprocessing, sampling and HTTP, and owns the terminal, so `--json`
prints exactly as on one card (msrun sends its workers' output to log files). Per call it sends the data inputs to
the ranks that run the graph — every rank for prefill and decode, rank 0 for vision — over an authenticated local
connection (multiprocessing.connection, one per rank), and joins the ranks' vocabulary slices of the logits. Only
the decoder's all-reduces run inside the graphs, on MindSpore's collectives (HCCL on Ascend, mccl on CPU): the
inputs start on the host anyway, and a host channel also carries what the CPU collectives could not (int32
positions and indices: the CPU backend reduces float32 and float16 only).

A worker that dies takes the group down: the driver sees its connection close (or msrun exit), kills every
process msrun started and raises a one-line error naming the rank and its log; it never waits on a dead rank.
"""

from __future__ import annotations

import atexit
import os
import pickle
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np

from mindvl.errors import ArtifactError
from mindvl.runtime import tp_worker
from mindvl.shapes.graphs import GraphSpec
from mindvl.shapes.manifest import Manifest

CONNECT_TIMEOUT_S = 60.0  # for msrun to start its scheduler and workers and each to connect (standard library only)
START_TIMEOUT_S = 900.0  # then the collectives' rendezvous and every rank's weight slices: minutes for a 72B
POLL_S = 0.5  # how often a wait looks at msrun itself (a closed connection is seen at once)


class WorkerError(ArtifactError):
    """A tensor-parallel worker failed or died; the group was stopped."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _msrun() -> str:
    beside = Path(sys.executable).parent / "msrun"  # the one installed with this interpreter's MindSpore
    found = str(beside) if beside.is_file() else shutil.which("msrun")
    if not found:
        raise ArtifactError("msrun is not installed (it comes with MindSpore): a tensor-parallel artifact starts its "
                            "workers with it; reinstall mindspore, or export with tp 1")
    return found


def _python_first(folder: Path) -> str:
    """A PATH whose `python` is this interpreter, whatever its file is called: msrun starts each process as
    `python SCRIPT` (the `python` of PATH)."""
    (folder / "bin").mkdir()
    launcher = folder / "bin" / "python"
    launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    launcher.chmod(0o700)
    return os.pathsep.join([str(folder / "bin"), os.environ.get("PATH", "")])


def _last_exception(log: Path) -> str:
    """The last Python exception a worker's log holds (`RuntimeError: ...`), or "" (a killed worker logs none)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    raised = [line.strip() for line in lines if re.match(r"[\w.]*(Error|Exception)\b.*:", line)]
    return raised[-1][:200] if raised else ""


class TensorParallelGraphs:
    """The executor of a tensor-parallel artifact (see the module doc), behind the same interface as
    `MindSporeGraphs`: `graph(spec)` loads a graph on its ranks, `run(spec, fed, cache_set)` runs it."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder, self.manifest, self.tp = folder, manifest, manifest.tp
        self.logs = Path(tempfile.mkdtemp(prefix="mindvl-tp-"))
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self._failed: str | None = None
        self.conns: list[Connection] = []
        self.pids: list[int] = []  # the workers', by rank
        self._started: list[int] = []  # every process msrun started that connected, the scheduler's too
        self.roles: dict[Connection, str] = {}  # what each connection is, for errors
        self.watched: list[Connection] = []  # the workers' and the scheduler's: any of them closing is a failure
        key = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self._listener.address
        env = {**os.environ, "MINDVL_TP_KEY": key.hex(), "PATH": _python_first(self.logs)}
        command = [_msrun(), f"--worker_num={self.tp}", f"--local_worker_num={self.tp}",
                   f"--master_port={_free_port()}", "--join=True", f"--log_dir={self.logs}", tp_worker.__file__,
                   str(folder.resolve()), host, str(port), ms.get_context("device_target"), str(os.getpid())]
        with (self.logs / "msrun.log").open("wb") as out:
            self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.close)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        """Accept msrun's scheduler and every worker as each starts, then wait for each worker's ready (or error),
        failing as soon as any of them dies."""
        accepted: list[Connection] = []

        def accept() -> None:
            try:
                accepted.extend(self._listener.accept() for _ in range(self.tp + 1))
            except OSError:  # the listener was closed: starting failed and the group is gone
                pass

        threading.Thread(target=accept, daemon=True).start()
        ready: dict[int, tuple[Connection, int]] = {}
        started = time.monotonic()
        while len(ready) < self.tp:
            for conn in wait(list(accepted), POLL_S):  # with none accepted yet: sleeps POLL_S
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"{self.roles.get(conn, 'a starting process')} exited while starting")
                if message[0] == "started":
                    role = "msrun's scheduler" if message[1] == "MS_SCHED" else "a worker"
                    self.roles[conn] = f"{role} (pid {message[2]})"
                    self._started.append(message[2])
                elif message[0] == "error":
                    self._fail(f"worker rank {message[1]}: {message[2]}", message[1])
                else:
                    ready[message[1]] = (conn, message[2])
                    self.roles[conn] = f"worker rank {message[1]}"
            if self.proc.poll() is not None:
                self._fail(f"msrun exited with status {self.proc.returncode} while starting")
            if len(accepted) <= self.tp and time.monotonic() > started + CONNECT_TIMEOUT_S:
                self._fail(f"{len(accepted)} of msrun's {self.tp + 1} processes connected within "
                           f"{CONNECT_TIMEOUT_S:.0f} s (one died while starting, or the machine is overloaded)")
            if time.monotonic() > started + START_TIMEOUT_S:
                self._fail(f"the workers were not ready within {START_TIMEOUT_S:.0f} s")
        self.conns = [ready[r][0] for r in range(self.tp)]
        self.pids = [ready[r][1] for r in range(self.tp)]
        self.watched = list(accepted)

    def _fail(self, why: str, rank: int | None = None) -> None:
        """Stop every worker and raise the one-line error that every later call raises too."""
        log = self.logs / ("msrun.log" if rank is None else f"worker_{rank}.log")
        self._stop_group()
        raised = _last_exception(log)
        self._failed = (f"tensor parallelism failed: {why}{' (' + raised + ')' if raised else ''}; all {self.tp} "
                        f"workers were stopped; see {log if log.exists() else self.logs}, and run again")
        raise WorkerError(self._failed)

    def _stop_group(self) -> None:
        """Kill msrun and every process it started: each runs in a session of its own, out of msrun's group."""
        for pid in self._started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._started.clear()
        if self.proc.returncode is None:  # not reaped yet, so its group id is still its own
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def _call(self, ranks: range, message: tuple) -> list[Any]:
        """Send `message` to `ranks` and return their results in rank order, watching every rank while waiting: a
        rank outside `ranks` that dies would otherwise leave the others blocked in a collective."""
        with self._lock:
            if self._failed:
                raise WorkerError(self._failed)
            try:
                return self._exchange(ranks, message)
            except WorkerError:
                raise
            except BaseException:  # interrupted with answers pending: every later answer would be out of step
                self._failed = (f"tensor parallelism stopped: a call to the {self.tp} workers was interrupted, and "
                                f"they were stopped; load the artifact again")
                self._stop_group()
                raise

    def _exchange(self, ranks: range, message: tuple) -> list[Any]:
        payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)  # once, however many ranks take it (`recv` reads it)
        for r in ranks:
            self._send(r, payload)
        results: dict[int, Any] = {}
        while len(results) < len(ranks):
            ready = wait(self.watched, POLL_S)
            if not ready and self.proc.poll() is not None:
                self._fail(f"msrun exited with status {self.proc.returncode}")
            for conn in ready:
                r = self.conns.index(conn) if conn in self.conns else None
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"{self.roles[conn]} exited", r)
                if r not in ranks:
                    self._fail(f"{self.roles[conn]} sent {status!r} unasked", r)
                if status == "error":  # its peers may be waiting for it in a collective: stop them all
                    self._fail(f"worker rank {r}: {value}", r)
                results[r] = value
        return [results[r] for r in ranks]

    def _send(self, rank: int, payload: bytes) -> None:
        try:
            self.conns[rank].send_bytes(payload)
        except OSError:
            self._fail(f"worker rank {rank}'s connection closed", rank)

    def _ranks(self, spec: GraphSpec) -> range:
        return range(1) if spec.weights == "vision" else range(self.tp)

    def graph(self, spec: GraphSpec) -> None:
        if spec.name not in self._loaded:
            self._call(self._ranks(spec), ("load", spec.name))
            self._loaded.add(spec.name)

    def caches(self, spec: GraphSpec, cache_set: int) -> tuple[Any, ...]:
        raise ArtifactError("a tensor-parallel artifact's KV caches live in its workers, one slice per rank")

    def run(self, spec: GraphSpec, fed: list[np.ndarray], cache_set: int) -> np.ndarray:
        parts = self._call(self._ranks(spec), ("run", spec.name, fed, cache_set))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)  # each rank's vocabulary slice

    def stats(self) -> list[dict[str, Any]]:
        """Each rank's pid, peak resident memory, graph calls and the milliseconds they took in the rank."""
        return self._call(range(self.tp), ("stats",))

    def allreduce_ms(self, shape: tuple[int, ...], repeats: int = 20) -> float:
        """What one all-reduce of a float32 `shape` costs on these ranks (median ms, as rank 0 measures it)."""
        return self._call(range(self.tp), ("allreduce", shape, repeats))[0]

    def close(self) -> None:
        """Stop the workers and remove their logs; idempotent. Each worker is asked to stop, so that none is killed
        inside a graph call; once all have answered, the group is killed rather than left to msrun's shutdown, which
        takes seconds and holds nothing worth keeping."""
        atexit.unregister(self.close)
        if self.proc.poll() is None and not self._failed and self.conns:
            try:
                self._call(range(self.tp), ("stop",))
            except WorkerError:
                pass
        self._stop_group()
        self._listener.close()
        if not self._failed:
            shutil.rmtree(self.logs, ignore_errors=True)
