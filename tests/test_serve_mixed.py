"""Hostile traffic mixed into normal traffic on a batch-4 server: requests of every hostile class are sent while
normal requests stream. Every normal answer equals its single-request answer, every hostile request gets its 4xx
within seconds, /health answers in under a second throughout, and the server's peak resident memory stays within
MEMORY_BOUND_BYTES.
"""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from media import b64, png_bomb, png_header_only, sample_image
from serve_helpers import running_server, user_message

from mindvl.runtime import Runtime

# Peak RSS of the server process: MindSpore and the tiny model take about 0.6 GB here; the bound leaves room for
# the normal traffic but not for what the hostile bodies would cost if they were decoded (20,000 images: 5.5 GB).
MEMORY_BOUND_BYTES = 2 * 2**30
HEALTH_SECONDS = 1.0
HOSTILE_SECONDS = 20.0  # each hostile request's answer, with the machine busy serving the normal ones

NORMAL = [("Write a short poem about the sea.", [], 40),
          ("Describe this image.", [sample_image(224, 224, seed=11)], 24),
          ("Name three colours.", [], 32), ("Compare.", [sample_image(112, 112, seed=3)], 16)]


def chat(server, messages, **fields):
    return {"model": server.model, "messages": messages, "max_tokens": 4, **fields}


def images(*urls):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": "What is it?"}]}]


def hostile_bodies(server) -> dict[str, tuple[int, bytes, dict]]:
    """name -> (expected status, body, extra headers), one or more per class of hostile input."""
    text = user_message("Hi.")
    tiny_png = png_header_only(28, 28)
    bodies = {
        "negative seed": (400, chat(server, text, seed=-5, temperature=0.5)),
        "top_p above 1": (400, chat(server, text, top_p=3.0, temperature=0.5)),
        "20,000 tiny images in 3 MB": (400, chat(server, images(*[b64(tiny_png)] * 20_000))),
        "10 MB of text": (400, chat(server, user_message("x" * 10_000_000))),
        "400,000-character stop": (400, chat(server, text, stop="ab" * 200_000)),
        "images past the prompt, by header": (400, chat(server, images(*[b64(png_header_only(224, 224))] * 8))),
        "PNG bomb": (413, chat(server, images(b64(png_bomb())))),
        "EPS posing as PNG": (400, chat(server, images(b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")))),
        "malformed URL": (400, chat(server, images("http://[::1"))),
        "file name too long": (400, chat(server, images("a" * 5000 + ".png"))),
        "path traversal": (400, chat(server, images("../../etc/passwd"))),
        "prompt beyond the buckets": (400, chat(server, user_message("word " * 400))),
        "max_tokens beyond the cache": (400, chat(server, text, max_tokens=5000)),
    }
    out = {name: (status, json.dumps(body).encode(), {}) for name, (status, body) in bodies.items()}
    surrogate = json.dumps(chat(server, text)).replace("Hi.", "Hi \\ud800").encode()
    out["lone surrogate"] = (400, surrogate, {})
    out["malformed JSON"] = (400, b'{"model": "x", "messages": [', {})
    out["foreign Origin"] = (403, json.dumps(chat(server, text)).encode(), {"Origin": "http://evil.example"})
    out["foreign Host"] = (403, json.dumps(chat(server, text)).encode(), {"Host": "evil.example"})
    out["form body"] = (415, b"model=x", {"Content-Type": "application/x-www-form-urlencoded"})
    return out


def send(server, body: bytes, headers: dict) -> int:
    headers = {"Content-Type": "application/json", **headers}
    return httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=60).status_code


def smuggled(server) -> int:
    """Content-Length and Transfer-Encoding together: refused, and the connection closed."""
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split()[1])


def stream_text(server, text, imgs, n) -> str:
    body = {"model": server.model, "messages": user_message(text, imgs), "max_tokens": n, "stream": True}
    pieces = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=300) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    pieces.append(event["choices"][0]["delta"]["content"])
    return "".join(pieces)


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


@pytest.fixture(scope="module")
def singles(batch4):
    runtime = Runtime.load(batch4)
    return [runtime.generate(text, images=imgs, max_new_tokens=n).text for text, imgs, n in NORMAL]


def test_hostile_requests_mixed_with_streams_hurt_none(batch4, singles, tmp_path):
    with running_server(batch4, tmp_path, "--media-dir", str(tmp_path)) as server:
        health, stop = [], threading.Event()

        def watch_health():
            while not stop.is_set():
                start = time.perf_counter()
                assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
                health.append(time.perf_counter() - start)
                time.sleep(0.05)

        hostile = hostile_bodies(server)

        def timed(name):
            start = time.perf_counter()
            status = smuggled(server) if name == "smuggled" else send(server, *hostile[name][1:])
            return status, time.perf_counter() - start

        names = [*hostile, "smuggled"] * 2
        with ThreadPoolExecutor(1) as watcher, ThreadPoolExecutor(12) as clients, ThreadPoolExecutor(4) as attackers:
            watching = watcher.submit(watch_health)
            try:
                normal = [clients.submit(stream_text, server, *NORMAL[i % len(NORMAL)]) for i in range(12)]
                answers = list(attackers.map(timed, names))
                texts = [f.result() for f in normal]
            finally:
                stop.set()  # however the run ends, so that the executors can shut down
            watching.result()

        assert texts == [singles[i % len(NORMAL)] for i in range(12)]
        for name, (status, seconds) in zip(names, answers, strict=True):
            assert status == (400 if name == "smuggled" else hostile[name][0]), name
            assert seconds < HOSTILE_SECONDS, (name, seconds)
        print(f"slowest /health {max(health):.3f} s of {len(health)}; slowest hostile answer "
              f"{max(s for _, s in answers):.2f} s; server peak RSS {peak_rss(server.process.pid) / 2**30:.2f} GiB")
        assert health and max(health) < HEALTH_SECONDS, max(health)
        assert peak_rss(server.process.pid) < MEMORY_BOUND_BYTES
        assert httpx.get(f"{server.url}/health").json()["running"] == 0
