"""A live `mindvl serve` in a child process on a free loopback port, and request builders, for tests/test_serve_*.

The server is the real command line (uvicorn, sockets, signals); its log is kept next to the test's files and
printed when it fails to start.
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
from typing import Iterator

import httpx
import uvicorn
from PIL import Image


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    port: int
    process: subprocess.Popen
    log: Path
    model: str  # the model id it serves
    headers: dict[str, str]  # the API key, when it has one

    def metric(self, name: str) -> float:
        """One unlabelled series of GET /metrics."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(artifacts: Path, log_dir: Path, *flags: str) -> Iterator[Server]:
    """`mindvl serve ARTIFACTS --port P FLAGS…` until /health answers; SIGTERM (then SIGKILL) on exit."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "MINDVL_API_KEY"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "mindvl", "serve", str(artifacts), "--port", str(port),
                                    *flags], stdout=out, stderr=subprocess.STDOUT, env={**env, "GLOG_v": "3"})
    key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else None
    server = Server(f"http://127.0.0.1:{port}", port, process, log, Path(artifacts).resolve().name,
                    {"Authorization": f"Bearer {key}"} if key else {})
    try:
        wait_until_healthy(server)
        yield server
    finally:
        stop(server)


@contextmanager
def in_process_server(app: object) -> Iterator[str]:
    """An ASGI app under uvicorn in a thread of this process, on a free loopback port, for tests that reach into
    the runtime it serves (to inject faults); yields its base URL. Shut down (lifespan included) on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


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
