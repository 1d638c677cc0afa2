"""`mindvl serve`: load the artifacts, build the app, run it under uvicorn until SIGINT or SIGTERM.

On a signal uvicorn stops accepting connections and gives the requests in flight up to `GRACE_SECONDS` to finish;
past that it cancels them (each frees its batch row) and the worker fails whatever is left with a 503.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import uvicorn

from mindvl.errors import MindVLError
from mindvl.runtime import Runtime
from mindvl.serve.app import Settings, create_app
from mindvl.serve.guard import deadline_protocol
from mindvl.serve.media import MediaPolicy

GRACE_SECONDS = 30
MAX_IMAGE_PIXELS = 4096 * 4096  # read from the header and refused before decoding: a 16.7 MP RGB image is 50 MB

log = logging.getLogger("mindvl.serve")


def serve(artifacts: str | Path, host: str = "127.0.0.1", port: int = 8000, media_dir: str | Path | None = None,
          max_concurrency: int = 64, api_key: str | None = None, allow_remote_media: bool = False,
          model_name: str | None = None, max_body_mb: float = 20, request_timeout: float = 30,
          device: str | None = None) -> None:
    if max_concurrency < 1 or max_body_mb <= 0 or request_timeout <= 0:
        raise MindVLError(f"--max-concurrency {max_concurrency}, --max-body-mb {max_body_mb} and --request-timeout "
                          f"{request_timeout} must all be positive; pass positive values")
    media = Path(media_dir).resolve() if media_dir else None
    if media is not None and not media.is_dir():
        raise MindVLError(f"--media-dir {media_dir} is not a folder; create it or name an existing one")
    runtime = Runtime.load(artifacts, device=device)
    max_body = int(max_body_mb * 2**20)
    settings = Settings(
        model_name=model_name or Path(artifacts).resolve().name,
        media=MediaPolicy(media, MAX_IMAGE_PIXELS, allow_remote_media, max_body, request_timeout),
        max_concurrency=max_concurrency, max_body_bytes=max_body, request_timeout=request_timeout, api_key=api_key)
    if not api_key and not _loopback(host):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    print(f"mindvl: serving {settings.model_name!r} at http://{host}:{port}/v1 (batch {runtime.buckets.batch[-1]}, "
          f"caches {list(runtime.buckets.cache)})", flush=True)
    config = uvicorn.Config(create_app(runtime, settings), host=host, port=port,
                            http=deadline_protocol(request_timeout), timeout_graceful_shutdown=GRACE_SECONDS)
    uvicorn.Server(config).run()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
