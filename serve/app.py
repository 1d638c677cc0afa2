"""The ASGI app: OpenAI's chat-completions and models endpoints, /health and /metrics, over one Runtime.

    client ─HTTP─▶ Guard (API key, body size and time) ─▶ routes ─▶ Completions ─queue─▶ Scheduler (worker thread)
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mindvl.runtime import Runtime
from mindvl.serve.completions import Completions
from mindvl.serve.errors import ServeError
from mindvl.serve.guard import Guard
from mindvl.serve.media import MediaPolicy
from mindvl.serve.metrics import Metrics
from mindvl.serve.scheduler import Scheduler
from mindvl.serve.schema import Limits
from mindvl.serve.shapelog import ShapeLog

log = logging.getLogger("mindvl.serve")


@dataclass(frozen=True)
class Settings:
    model_name: str
    media: MediaPolicy
    max_concurrency: int = 64  # requests in flight (queued or generating); one more gets a 429
    max_body_bytes: int = 20 * 2**20
    request_timeout: float = 30.0  # seconds a client may take to send a request's head, and then its body
    api_key: str | None = None
    host: str = "127.0.0.1"  # the address it listens on: on loopback, requests must name a loopback Host
    allowed_origins: tuple[str, ...] = ()  # web pages that may call it (CORS), as scheme://host[:port]
    limits: Limits = Limits()  # what one request may hold
    stall_timeout: float = 120.0  # seconds the worker may hold work without completing a step before /health fails
    shape_log: ShapeLog | None = None  # --log-shapes: where each chat completion's shapes are appended


def create_app(runtime: Runtime, settings: Settings) -> FastAPI:
    metrics = Metrics()
    scheduler = Scheduler(runtime, metrics)
    completions = Completions(runtime, scheduler, metrics, settings.media, settings.model_name,
                              settings.max_concurrency, settings.limits, settings.shape_log)
    metrics.gauge("mindvl_queue_depth", "Requests queued for the batch.", lambda: scheduler.queue_depth)
    metrics.gauge("mindvl_running_sequences", "Sequences generating in the batch.", lambda: scheduler.running)
    metrics.gauge("mindvl_requests_in_flight", "Chat completions accepted and not yet answered.",
                  lambda: completions.in_flight)
    card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "mindvl"}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        # uvicorn has let in-flight requests finish (or cancelled them past its grace period) by now.
        await anyio.to_thread.run_sync(scheduler.stop)

    app = FastAPI(title="mindvl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       timeout=settings.request_timeout, metrics=metrics, host=settings.host,
                       origins=settings.allowed_origins)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await completions(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise ServeError(404, f"model {model_id[:100]!r} does not exist; this server serves "
                                  f"{settings.model_name!r}", code="model_not_found")
        return card

    @app.get("/health")
    async def health() -> dict[str, Any]:
        if not scheduler.alive:
            raise ServeError(503, "the generation worker has stopped; see the server log and restart the server")
        stalled = scheduler.stalled_for()
        if stalled > settings.stall_timeout:
            raise ServeError(503, f"the generation worker has made no progress for {stalled:.0f} s with "
                                  f"{scheduler.running + scheduler.queue_depth} requests waiting (--stall-timeout "
                                  f"{settings.stall_timeout:g}); see the server log and restart the server")
        return {"status": "ok", "model": settings.model_name, "queue_depth": scheduler.queue_depth,
                "running": scheduler.running}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _serve_error(request: Request, e: ServeError) -> Response:
    return e.response()


async def _http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own 404 (no such path) and 405 (wrong method), in OpenAI's error shape."""
    fix = "see GET /v1/models, POST /v1/chat/completions, GET /health, GET /metrics"
    message = f"{request.method} {request.url.path[:100]}: {e.detail.lower()}; {fix}"
    return ServeError(e.status_code, message, headers=e.headers).response()


async def _internal_error(request: Request, e: Exception) -> Response:
    # The traceback goes to the server log (Starlette re-raises to uvicorn after this), never to the client.
    return JSONResponse(ServeError(500, "internal server error; see the server log").body(), status_code=500)
