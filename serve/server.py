"""`mindvl serve`: load the artifacts, build the app, run it under uvicorn until SIGINT or SIGTERM.

On a signal uvicorn stops accepting connections and gives the requests in flight up to `GRACE_SECONDS` to finish;
past that it cancels them (each frees its batch row) and the worker fails whatever is left with a 503.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import uvicorn

from mindvl.errors import MindVLError
from mindvl.runtime import Runtime
from mindvl.runtime.runtime import PREFIX_CACHE_MB, VISION_CACHE_MB
from mindvl.serve.app import Settings, create_app
from mindvl.serve.guard import deadline_protocol, loopback, parse_origins
from mindvl.serve.media import MediaPolicy
from mindvl.serve.remote import parse_networks
from mindvl.serve.schema import Limits
from mindvl.serve.shapelog import ShapeLog

GRACE_SECONDS = 30
MAX_IMAGE_PIXELS = 4096 * 4096  # read from the header and refused before decoding: a 16.7 MP RGB image is 50 MB
# Text characters a request may hold per slot of the largest cache: a prompt of that many characters would need
# tokens of 16 characters on average to fit, so longer text is refused before it is tokenized.
CHARS_PER_CACHE_SLOT = 16

log = logging.getLogger("mindvl.serve")


def serve(artifacts: str | Path, host: str = "127.0.0.1", port: int = 8000, media_dir: str | Path | None = None,
          max_concurrency: int = 64, api_key: str | None = None, allow_remote_media: bool = False,
          model_name: str | None = None, max_body_mb: float = 20, request_timeout: float = 30,
          device: str | None = None, allow_media_network: Sequence[str] = (),
          allow_origin: Sequence[str] = (), max_images: int = 16, max_videos: int = 2, max_parts: int = 64,
          max_text_chars: int | None = None, max_media_mb: float = 100, stall_timeout: float = 120,
          prefix_cache_mb: float = PREFIX_CACHE_MB, vision_cache_mb: float = VISION_CACHE_MB,
          log_shapes: str | Path | None = None, fmt: str | None = None, provider: str = "CPU") -> None:
    """`max_text_chars` None: CHARS_PER_CACHE_SLOT characters per slot of the largest KV cache; `log_shapes`: the
    file each chat completion's shapes are appended to (`serve/shapelog.py`); `fmt`, `provider`: which graphs run
    and where (`Runtime.load`)."""
    positive = {"--max-concurrency": max_concurrency, "--max-body-mb": max_body_mb,
                "--request-timeout": request_timeout, "--max-parts": max_parts, "--max-media-mb": max_media_mb,
                "--max-text-chars": 1 if max_text_chars is None else max_text_chars, "--stall-timeout": stall_timeout}
    positive_or_zero = {"--max-images": max_images, "--max-videos": max_videos, "--prefix-cache-mb": prefix_cache_mb,
                        "--vision-cache-mb": vision_cache_mb}
    bad = [f"{flag} {value}" for flag, value in positive.items() if not value > 0]
    bad += [f"{flag} {value}" for flag, value in positive_or_zero.items() if not value >= 0]
    if bad:
        raise MindVLError(f"{', '.join(bad)}: pass a positive value (--max-images, --max-videos and the caches' "
                          "sizes may be 0)")
    media = Path(media_dir).resolve() if media_dir else None
    if media is not None and not media.is_dir():
        raise MindVLError(f"--media-dir {media_dir} is not a folder; create it or name an existing one")
    networks, origins = parse_networks(allow_media_network), parse_origins(allow_origin)
    if networks and not allow_remote_media:
        raise MindVLError("--allow-media-network only matters with --allow-remote-media; add that flag or drop it")
    shape_log = ShapeLog(log_shapes) if log_shapes else None  # before the runtime loads: a wrong path fails fast
    try:
        runtime = Runtime.load(artifacts, device=device, prefix_cache_mb=prefix_cache_mb,
                               vision_cache_mb=vision_cache_mb, fmt=fmt, provider=provider)
        max_body = int(max_body_mb * 2**20)
        settings = Settings(
            model_name=model_name or Path(artifacts).resolve().name,
            media=MediaPolicy(media, MAX_IMAGE_PIXELS, allow_remote_media, max_body, request_timeout, networks,
                              int(max_media_mb * 2**20)),
            max_concurrency=max_concurrency, max_body_bytes=max_body, request_timeout=request_timeout,
            api_key=api_key, host=host, allowed_origins=origins, stall_timeout=stall_timeout, shape_log=shape_log,
            limits=Limits(max_images, max_videos, max_parts,
                          max_text_chars or CHARS_PER_CACHE_SLOT * runtime.buckets.cache[-1]))
        if not api_key and not loopback(host):
            log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
        print(f"mindvl: serving {settings.model_name!r} at http://{host}:{port}/v1 (batch "
              f"{runtime.buckets.batch[-1]}, caches {list(runtime.buckets.cache)}; per request at most "
              f"{settings.limits.images} images, {settings.limits.videos} videos, {settings.limits.text_chars} "
              "characters of text)", flush=True)
        config = uvicorn.Config(create_app(runtime, settings), host=host, port=port,
                                http=deadline_protocol(request_timeout), timeout_graceful_shutdown=GRACE_SECONDS)
        uvicorn.Server(config).run()
    finally:
        if shape_log is not None:
            shape_log.close()
