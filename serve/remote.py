"""Fetching an image URL a request names (--allow-remote-media) without letting the request reach into the server's
network or hold the server for long.

    url ─http(s)─▶ getaddrinfo ─every address public or in --allow-media-network─▶ connect to that very address
        ─GET, with the URL's host as Host and TLS name─▶ 200: a body of at most max_bytes
                                                      30x: the same again for its Location, at most 3 times

The whole fetch, redirects included, has one deadline: every socket operation may only take the time left. Any
failure is a `FetchError` whose text is for the server log only: the client gets one generic message, so it cannot
tell a refused port from a timeout or a 404 and map the network through the server.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from typing import Sequence, Union
from urllib.parse import urljoin, urlsplit

from mindvl.errors import MindVLError

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
TLS = ssl.create_default_context()  # certificates verified against the URL's host name


class FetchError(Exception):
    """Why a fetch failed, for the server log; never shown to the client."""


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """The --allow-media-network values, checked."""
    try:
        return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)
    except ValueError as e:
        raise MindVLError(f"--allow-media-network: {e}; write a network as ADDRESS/PREFIX with the host bits zero, "
                          "e.g. 10.0.0.0/8") from None


def address_allowed(address: Address, allowed: Sequence[Network] = ()) -> bool:
    """Whether a fetch may connect to `address`: one inside a network the operator allowed, or a public one.
    An IPv4-mapped IPv6 address reaches its IPv4 address, so it is judged as that; a 6to4 one (2002::/16) is
    routed to the IPv4 address it embeds, which must be public too."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return True
    embedded = address.sixtofour if isinstance(address, ipaddress.IPv6Address) else None
    return _public(address) and (embedded is None or _public(embedded))


def _public(address: Address) -> bool:
    # is_global alone lets multicast (224.0.1.1) and NAT64's 64:ff9b::/96 through.
    return address.is_global and not (address.is_multicast or address.is_reserved)


def fetch(url: str, max_bytes: int, timeout: float, allowed: Sequence[Network] = ()) -> bytes:
    """The body of a 200 answer to GET `url`, following up to MAX_REDIRECTS redirects, each judged like `url`."""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = _get(url, max_bytes, deadline, allowed)
            if status == 200:
                return body
            if status not in REDIRECTS or not location:
                raise FetchError(f"{url[:200]} answered HTTP {status}")
            url = urljoin(url, location)
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, refusals, TLS, malformed answers
        raise FetchError(f"{type(e).__name__}: {e}") from None
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _get(url: str, max_bytes: int, deadline: float, allowed: Sequence[Network]) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one GET; the body only for a 200."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{url[:200]} is not an http(s) URL with a host")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    sock = _connect(parts.hostname, port, deadline, allowed)
    try:
        if https:
            sock.settimeout(_left(deadline))
            sock = TLS.wrap_socket(sock, server_hostname=parts.hostname)
        connection = http.client.HTTPConnection(parts.hostname, port)
        connection.sock = _Deadline(sock, deadline)  # never connects by itself: it has a socket
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target, headers={"Host": parts.netloc.rpartition("@")[2], "Accept": "image/*",
                                                   "Connection": "close", "User-Agent": "mindvl"})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"{url[:200]} announced {length} bytes, more than the {max_bytes} allowed")
        body = response.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise FetchError(f"{url[:200]} sent more than the {max_bytes} bytes allowed")
        return 200, None, body
    finally:
        sock.close()


def _connect(host: str, port: int, deadline: float, allowed: Sequence[Network]) -> socket.socket:
    """A socket connected to one of `host`'s addresses, once every one of them is allowed. Connecting to the very
    address checked (not to the name again) leaves DNS no second answer to give, so rebinding cannot redirect it."""
    found = _resolve(host, port, deadline)
    refused = [info[4][0] for info in found if not address_allowed(ipaddress.ip_address(info[4][0]), allowed)]
    if refused:
        raise FetchError(f"{host} resolves to {', '.join(refused)}, not a public address nor one in "
                         "--allow-media-network")
    for i, (family, kind, proto, _, address) in enumerate(found):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except OSError:
            sock.close()
            if i == len(found) - 1:
                raise
    raise FetchError(f"{host} has no address")


def _resolve(host: str, port: int, deadline: float) -> list[tuple]:
    """getaddrinfo within the deadline. It takes no timeout, so it runs in a thread of its own, left to finish
    on its own past the deadline: a shared pool would let one request's stalled lookups hold up another's."""
    answer: concurrent.futures.Future[list[tuple]] = concurrent.futures.Future()

    def lookup() -> None:
        try:
            answer.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as e:  # handed to the waiting thread, which raises it
            answer.set_exception(e)

    threading.Thread(target=lookup, name="mindvl-resolve", daemon=True).start()
    try:
        return answer.result(timeout=_left(deadline))
    except concurrent.futures.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        raise TimeoutError(f"resolving {host} took past the fetch's deadline") from None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch's deadline passed")
    return left


class _Deadline:
    """The socket as http.client sees it: every send and receive may take only the time left before the deadline
    (a per-operation timeout alone would let a server trickle one byte per timeout for ever)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(_left(self.deadline))
        self.sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self))

    def close(self) -> None:
        """Left to `_get`: http.client closes its connection as soon as the answer's head is read."""


class _Reader(io.RawIOBase):
    def __init__(self, deadline: _Deadline) -> None:
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        self.deadline.sock.settimeout(_left(self.deadline.deadline))
        return self.deadline.sock.recv_into(buffer)
