"""What a request must pass before its handler sees it, and the deadlines a slow client gets.

`Guard` (ASGI middleware): the API key (compared in constant time), the body's size (from Content-Length, then
counted as it arrives) and the time the client may take to send the body; it also counts every response for
/metrics. `deadline_protocol`: uvicorn's HTTP/1.1 protocol with a deadline on each request head, which uvicorn
lacks, so a client sending its headers a byte at a time (slow-loris) cannot hold a connection for ever.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from mindvl.serve.errors import ServeError
from mindvl.serve.metrics import Metrics

OPEN_PATHS = ("/health",)  # answered without the API key, for load balancers and probes
PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")  # the rest count as "other" in /metrics
CLOSE = {"Connection": "close"}  # the client may still be sending: do not read on, close


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, timeout: float,
                 metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes, self.timeout = max_body_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            refused = self._refusal(scope)
            if refused:
                await refused.response()(scope, receive, counted)
            else:
                await self.app(scope, self._bounded(receive), counted)
        finally:
            code = status[0] if status else 500
            self.metrics.count("mindvl_requests_total", path=_path_label(scope["path"]), status=str(code))
            if code >= 400:
                self.metrics.count("mindvl_request_errors_total", status=str(code))

    def _refusal(self, scope: Scope) -> ServeError | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS:
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                return ServeError(401, "missing or wrong API key; send the key the server was started with as "
                                       "'Authorization: Bearer KEY'", code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return ServeError(400, "Content-Length is not a number; send the body's size in bytes", headers=CLOSE)
        if int(length) > self.max_body_bytes:
            return _too_large(int(length), self.max_body_bytes, whole=True)
        return None

    def _bounded(self, receive: Receive) -> Receive:
        """`receive` that refuses a body past the size limit (413) or not complete within the timeout (408)."""
        loop = asyncio.get_running_loop()
        deadline, size, done = loop.time() + self.timeout, 0, False

        async def bounded() -> Message:
            nonlocal size, done
            if done:  # the body is in; what follows is the disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise ServeError(408, f"the request body did not arrive within {self.timeout:g} s; send it whole "
                                      "without pausing", headers=CLOSE) from None
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    raise _too_large(size, self.max_body_bytes, whole=False)
                done = not message.get("more_body", False)
            return message

        return bounded


def _path_label(path: str) -> str:
    """A known path, or a template: a client probing random paths must not grow /metrics without bound."""
    if path in PATHS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def _too_large(size: int, limit: int, whole: bool) -> ServeError:
    """`whole`: `size` is the body's (from Content-Length), not what arrived before reading stopped."""
    return ServeError(413, f"the request body is {'' if whole else 'over '}{size} bytes, more than the "
                           f"{limit} allowed (--max-body-mb); send smaller or fewer images",
                      code="request_too_large", headers=CLOSE)


def deadline_protocol(timeout: float) -> Callable[..., H11Protocol]:
    """uvicorn's h11 protocol, closing a connection with a 408 when a request head takes longer than `timeout`
    seconds to arrive (from the connection's start, or from the previous response)."""
    body = json.dumps(ServeError(408, f"the request headers did not arrive within {timeout:g} s; send them "
                                      "whole without pausing").body()).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s" % (len(body), body))

    class DeadlineH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer:
                self._timer.cancel()
            self._timer = self.loop.call_later(timeout, self._expire, self.cycle)

        def _expire(self, cycle: object) -> None:
            # No request head was completed since the timer was armed (uvicorn makes a new cycle for each head).
            if self.cycle is cycle and not self.transport.is_closing():
                if self.conn.trailing_data[0]:  # part of a head came: say why; an idle connection just closes
                    self.transport.write(reply)
                self.transport.close()

    return DeadlineH11Protocol
