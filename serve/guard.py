"""What a request must pass before its handler sees it, and the deadlines a slow client gets.

`Guard` (ASGI middleware), in order: an unambiguous body length; on a server bound to loopback, a loopback Host
(else a web page could rebind its DNS name to 127.0.0.1 and read the answers); no Origin, or one allowed with
--allow-origin (CORS, with preflights answered here); the API key (compared in constant time); a JSON Content-Type
on POST (so a web page's plain form cannot post); the body's size (from Content-Length, then counted as it
arrives) and the time the client may take to send the body. It also counts every response for /metrics.
`deadline_protocol`: uvicorn's HTTP/1.1 protocol with a deadline on each request head, which uvicorn lacks, so a
client sending its headers a byte at a time (slow-loris) cannot hold a connection for ever; and a JSON 400 for a
request h11 cannot parse (a malformed head, a Content-Length that is not a number or differs between headers).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from typing import Callable, Sequence
from urllib.parse import urlsplit

import h11
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from mindvl.errors import MindVLError
from mindvl.serve.errors import ServeError
from mindvl.serve.metrics import Metrics

OPEN_PATHS = ("/health",)  # answered without the API key, for load balancers and probes
PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")  # the rest count as "other" in /metrics
CLOSE = {"Connection": "close"}  # the client may still be sending: do not read on, close
# A CORS preflight's answer: what a page from an allowed origin may send, cached by the browser for 10 minutes.
PREFLIGHT = {"Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": "Authorization, Content-Type",
             "Access-Control-Max-Age": "600"}


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, timeout: float,
                 metrics: Metrics, host: str = "127.0.0.1", origins: Sequence[str] = ()) -> None:
        self.app, self.metrics = app, metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes, self.timeout = max_body_bytes, timeout
        self.loopback_only = loopback(host)  # bound elsewhere, any Host may be a name of this machine
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"")
        cors = [(b"vary", b"Origin")] + ([(b"access-control-allow-origin", origin)]
                                         if origin.decode("latin-1") in self.origins else [])

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            answer = self._answer(scope, headers)
            if answer:
                await answer(scope, receive, counted)
            else:
                await self.app(scope, self._bounded(receive), counted)
        finally:
            code = status[0] if status else 500
            self.metrics.count("mindvl_requests_total", path=_path_label(scope["path"]), status=str(code))
            if code >= 400:
                self.metrics.count("mindvl_request_errors_total", status=str(code))

    def _answer(self, scope: Scope, headers: dict[bytes, bytes]) -> Response | None:
        """What to send instead of calling the app: a refusal, or the answer to a CORS preflight, which needs no
        API key (the browser sends it by itself, without the page's headers, before the request that has them)."""
        refused = _ambiguous_length(headers) or self._foreign_host(headers) or self._foreign_origin(headers)
        if refused:
            return refused.response()
        if scope["method"] == "OPTIONS" and b"origin" in headers and b"access-control-request-method" in headers:
            return Response(status_code=204, headers=PREFLIGHT)
        refused = self._unauthorized(scope, headers) or _not_json(scope, headers) or self._too_long(headers)
        return refused.response() if refused else None

    def _foreign_host(self, headers: dict[bytes, bytes]) -> ServeError | None:
        host = headers.get(b"host")  # absent only from HTTP/1.0 clients, never from a browser
        if not self.loopback_only or host is None or loopback(_host_name(host.decode("latin-1"))):
            return None
        return ServeError(403, f"Host {host.decode('latin-1')[:100]!r} is not a loopback name, and this server "
                               "listens on loopback only (a guard against DNS rebinding); connect via 127.0.0.1 or "
                               "localhost, or start the server with --host to serve other names",
                          code="host_not_allowed", headers=CLOSE)

    def _foreign_origin(self, headers: dict[bytes, bytes]) -> ServeError | None:
        origin = headers.get(b"origin")
        if origin is None or origin.decode("latin-1") in self.origins:
            return None
        return ServeError(403, f"requests from web pages of origin {origin.decode('latin-1')[:100]!r} are refused; "
                               "start the server with --allow-origin ORIGIN to let a page's ORIGIN call it",
                          code="origin_not_allowed", headers=CLOSE)

    def _unauthorized(self, scope: Scope, headers: dict[bytes, bytes]) -> ServeError | None:
        if not self.api_key or scope["path"] in OPEN_PATHS:
            return None
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key):
            return None
        return ServeError(401, "missing or wrong API key; send the key the server was started with as "
                               "'Authorization: Bearer KEY'", code="invalid_api_key")

    def _too_long(self, headers: dict[bytes, bytes]) -> ServeError | None:
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


def loopback(host: str) -> bool:
    """Whether `host`, a name or an address (as --host takes it, or a Host header without its port), is this
    machine's loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def parse_origins(values: Sequence[str]) -> tuple[str, ...]:
    """The --allow-origin values, checked and in the form a browser sends: scheme://host[:port], lower case."""
    for value in values:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc \
                or value != f"{parts.scheme}://{parts.netloc}":
            raise MindVLError(f"--allow-origin {value!r} is not an origin; write scheme://host[:port], e.g. "
                              "https://app.example.com, without a path or a trailing slash")
    return tuple(value.lower() for value in values)


def _host_name(authority: str) -> str:
    """A Host header's name or address, without the port: '[::1]:8000' -> '::1', 'localhost:8000' -> 'localhost'."""
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.partition(":")[0]


def _ambiguous_length(headers: dict[bytes, bytes]) -> ServeError | None:
    # h11 takes Transfer-Encoding over Content-Length when both come; a proxy in front may take the other, and
    # then a body could smuggle a second request past it (RFC 9112 section 6.1). Refused, and the connection closed.
    if b"transfer-encoding" in headers and b"content-length" in headers:
        return ServeError(400, "the request has both Content-Length and Transfer-Encoding, so its body's length is "
                               "ambiguous; send only one of them", headers=CLOSE)
    return None


def _not_json(scope: Scope, headers: dict[bytes, bytes]) -> ServeError | None:
    # A web page may post a form (urlencoded, multipart, text/plain) anywhere without a CORS preflight, not JSON.
    if scope["method"] != "POST":
        return None
    kind = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
    if kind == b"application/json":
        return None
    sent = repr(kind.decode("latin-1")[:100]) if kind else "missing"
    return ServeError(415, f"the body's Content-Type is {sent}, and only JSON is accepted; send it with "
                           "'Content-Type: application/json'", code="unsupported_media_type")


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
    seconds to arrive (from the connection's start, or from the previous response), and answering a request h11
    cannot parse with a JSON 400 (uvicorn's is plain text)."""
    body = json.dumps(ServeError(408, f"the request headers did not arrive within {timeout:g} s; send them "
                                      "whole without pausing").body()).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s" % (len(body), body))
    malformed = json.dumps(ServeError(400, "malformed HTTP request (its request line or headers, or a "
                                           "Content-Length that is not a number or differs between headers); send "
                                           "one well-formed HTTP/1.1 request").body()).encode()

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

        def send_400_response(self, msg: str) -> None:
            # Through h11 as uvicorn's does, so h11 refuses it should a response already be under way.
            head = h11.Response(status_code=400, reason=b"Bad Request",
                                headers=[(b"content-type", b"application/json"), (b"connection", b"close"),
                                         (b"content-length", b"%d" % len(malformed))])
            for event in (head, h11.Data(data=malformed), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

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
