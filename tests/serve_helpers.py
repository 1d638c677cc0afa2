"""A live `mindvl serve` in a child process on a free loopback port, the same app in a thread of the test's process,
a gate that holds a runtime's decode steps, and request builders, for tests/test_serve_* and tests/test_faults.

The child server is the real command line (uvicorn, sockets, signals); its log is kept next to the test's files and
printed when it fails to start. The in-process server lets a test reach into the runtime it serves: the package has
no test hooks, so tests wrap the runtime's graph calls.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx
import uvicorn
from PIL import Image

from mindvl.runtime import Runtime
from mindvl.serve.app import Settings, create_app
from mindvl.serve.media import MediaPolicy


@dataclass
class Endpoint:
    """A server the test reaches over loopback."""

    url: str  # http://127.0.0.1:PORT
    port: int
    model: str  # the model id it serves
    headers: dict[str, str]  # the API key, when it has one

    def metric(self, name: str) -> float:
        """One unlabelled series of GET /metrics."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match[1])


@dataclass
class Server(Endpoint):
    """`mindvl serve` in a child process."""

    process: subprocess.Popen
    log: Path


class DecodeGate:
    """While closed, every decode graph call of `runtime` waits: a generation holds in a decode step, a point the
    test knows, until the test opens the gate, however fast or slow the machine. Prefill and vision calls pass, so a
    request held here has been admitted and prefilled. Wraps `runtime.artifacts.run`."""

    def __init__(self, runtime: Runtime) -> None:
        self._open = threading.Event()
        self._open.set()
        self.holding = threading.Event()  # a decode call has waited at the gate since it was last closed
        run = runtime.artifacts.run

        def gated_run(spec, inputs, *cache_set):
            if spec.kind == "decode" and not self._open.is_set():
                self.holding.set()
                self._open.wait()
            return run(spec, inputs, *cache_set)

        runtime.artifacts.run = gated_run

    def close(self) -> None:
        self.holding.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """Closed for the block and open after it, however it ends (a server shutting down waits for its worker)."""
        self.close()
        try:
            yield
        finally:
            self.open()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(artifacts: Path, log_dir: Path, *flags: str,
                   python: Sequence[str] = ("-m", "mindvl")) -> Iterator[Server]:
    """`python -m mindvl serve ARTIFACTS --port P FLAGS…` until /health answers; SIGTERM (then SIGKILL) on exit.
    `python`: the interpreter's arguments before `serve`, for a script that runs the command line its own way."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "MINDVL_API_KEY"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, *python, "serve", str(artifacts), "--port", str(port), *flags],
                                   stdout=out, stderr=subprocess.STDOUT, env={**env, "GLOG_v": "3"})
    key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else None
    server = Server(url=f"http://127.0.0.1:{port}", port=port, model=Path(artifacts).resolve().name,
                    headers={"Authorization": f"Bearer {key}"} if key else {}, process=process, log=log)
    try:
        wait_until_healthy(server)
        yield server
    finally:
        stop(server)


@contextmanager
def in_process_server(runtime: Runtime, **settings) -> Iterator[Endpoint]:
    """`mindvl serve`'s app over `runtime` under uvicorn in a thread of this process, on a free loopback port, for
    tests that reach into the runtime (to hold its decode steps, to inject faults). `settings` override Settings'
    (model "in-process", no media folder). Shut down (lifespan included) on exit."""
    settings = Settings(**{"model_name": "in-process", "media": MediaPolicy(None, 4096 * 4096, False, 2**20, 30),
                           **settings})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield Endpoint(f"http://127.0.0.1:{port}", port, settings.model_name,
                       {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {})
    finally:
        server.should_exit = True
        thread.join(60)


def wait_for(condition: Callable[[], bool], within: float = 120) -> None:
    """Until `condition()` holds: a state of the server the test waits on (`within` seconds only bound a failure)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there in time"
        time.sleep(0.02)


def wait_until_healthy(server: Server, within: float = 180) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert server.process.poll() is None, f"the server exited:\n{server.log.read_text()}"
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not start within {within} s:\n{server.log.read_text()}")


def stop(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_message(text: str, images: list[Image.Image] = (), videos: list[str] = ()) -> list[dict]:
    """One user turn as the runtime builds it: images (as data: URLs), then videos (by name), then the text."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    parts += [{"type": "video_url", "video_url": {"url": v}} for v in videos]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
