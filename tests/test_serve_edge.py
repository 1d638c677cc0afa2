"""What a live `mindvl serve` does at its edges: fetching remote images without reaching into the network or
waiting on a slow host (serve/remote.py), and refusing browser attacks and ambiguous HTTP framing (serve/guard.py).
Each refusal is a one-line JSON error, and the next normal request is still answered.

Remote images come from small HTTP servers in this process on 127.0.0.2 and 127.0.0.3 (all of 127/8 is loopback):
the mindvl server may reach 127.0.0.2 only, and only when told so with --allow-media-network.
"""

import contextlib
import http.server
import io
import ipaddress
import re
import socket
import threading
import time

import httpx
import pytest
from media import sample_image
from serve_helpers import data_url, running_server, user_message

from mindvl.runtime import Runtime
from mindvl.serve.remote import FetchError, address_allowed, fetch, parse_networks

KEY = "edge-key-7d1c"
ORIGIN = "http://app.example:8080"
TIMEOUT_S = 2
MAX_BODY_MB = 0.1
NORMAL = "Say something."
IMAGE = sample_image(112, 112, seed=7)
GENERIC = (r"^messages\[0\]\.content\[0\]: the image URL could not be fetched; it must be a public http\(s\) URL that "
           rf"answers with an image of at most {int(MAX_BODY_MB * 2**20)} bytes within {TIMEOUT_S} s, or send the "
           r"image as a data: URL$")


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the remote hosts --------------------------------------------------------------------------------------------

class Remote(http.server.BaseHTTPRequestHandler):
    """GET routes of the test's remote hosts; `other` is the base URL of the host on the other address."""

    other = ""
    release = threading.Event()  # set at the end of the module: stalled answers then end

    def do_GET(self):
        with contextlib.suppress(OSError):  # the mindvl server may hang up first, as it should
            route = {"/photo.png": self.photo, "/missing.png": self.missing, "/elsewhere.png": self.elsewhere,
                     "/hop.png": self.hop, "/loop.png": self.loop, "/stall.png": self.stall,
                     "/big.png": self.big, "/big-announced.png": self.big_announced,
                     "/host.txt": self.host}[self.path]
            route()

    def photo(self):
        self.answer(png(IMAGE))

    def missing(self):
        self.send_error(404)

    def elsewhere(self):
        self.redirect(f"{self.other}/photo.png")

    def hop(self):
        self.redirect("/photo.png")

    def loop(self):
        self.redirect("/loop.png")

    def stall(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.flush()
        self.release.wait(60)

    def big(self):  # no Content-Length: the reader must stop by itself
        self.send_response(200)
        self.end_headers()
        self.wfile.write(bytes(200_000))

    def big_announced(self):
        self.answer(bytes(200_000))

    def host(self):
        self.answer(self.headers["Host"].encode())

    def answer(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def remotes():
    """Base URLs of the remote hosts on 127.0.0.2 and 127.0.0.3."""
    hosts = [http.server.ThreadingHTTPServer((address, 0), Remote) for address in ("127.0.0.2", "127.0.0.3")]
    urls = [f"http://{host.server_address[0]}:{host.server_address[1]}" for host in hosts]
    Remote.other = urls[1]
    for host in hosts:
        threading.Thread(target=host.serve_forever, daemon=True).start()
    yield urls
    Remote.release.set()
    for host in hosts:
        host.shutdown()
        host.server_close()


def closed_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


# --- the mindvl servers ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(exported, tmp_path_factory):
    """No remote media; an API key and one allowed origin; default request timeout, so a connection it closes
    right after an answer is one it chose to close."""
    with running_server(exported("tiny")[1], tmp_path_factory.mktemp("plain"), "--api-key", KEY,
                        "--allow-origin", ORIGIN) as server:
        yield server


@pytest.fixture(scope="module")
def remote_only_public(exported, tmp_path_factory):
    with running_server(exported("tiny")[1], tmp_path_factory.mktemp("public"), "--allow-remote-media",
                        "--request-timeout", str(TIMEOUT_S), "--max-body-mb", str(MAX_BODY_MB)) as server:
        yield server


@pytest.fixture(scope="module")
def remote_127_0_0_2(exported, tmp_path_factory):
    with running_server(exported("tiny")[1], tmp_path_factory.mktemp("allowed"), "--allow-remote-media",
                        "--allow-media-network", "127.0.0.2/32", "--request-timeout", str(TIMEOUT_S),
                        "--max-body-mb", str(MAX_BODY_MB)) as server:
        yield server


@pytest.fixture(scope="module")
def normal_answer(exported):
    return Runtime.load(exported("tiny")[1]).generate(NORMAL, max_new_tokens=8).text


def post(server, body=None, headers=None, **options):
    headers = {"Content-Type": "application/json", **server.headers, **(headers or {})}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60, **options)


def chat(server, messages=None, **fields):
    return {"model": server.model, "messages": messages or user_message(NORMAL), "max_tokens": 8, **fields}


def with_image(server, url):
    return chat(server, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is it?"}]}])


def assert_served_normally(server, answer):
    reply = post(server, chat(server))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == answer


def error_message(reply, status: int) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "\n" not in body["error"]["message"]
    return body["error"]["message"]


# --- remote media ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("::1", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("::", False),
    ("10.1.2.3", False), ("192.168.0.1", False), ("169.254.169.254", False), ("fe80::1", False),
    ("100.64.0.1", False), ("224.0.1.1", False), ("255.255.255.255", False), ("fc00::1", False),
    ("64:ff9b::7f00:1", False), ("2002:7f00:1::", False),
])
def test_only_public_addresses_are_fetched_by_default(address, allowed):
    assert address_allowed(ipaddress.ip_address(address)) is allowed


def test_an_allowed_network_opens_exactly_its_addresses():
    networks = parse_networks(["10.0.0.0/8", "fd00::/8"])
    assert address_allowed(ipaddress.ip_address("10.9.8.7"), networks)
    assert address_allowed(ipaddress.ip_address("::ffff:10.9.8.7"), networks)  # the same IPv4 host
    assert address_allowed(ipaddress.ip_address("fd12::1"), networks)
    assert not address_allowed(ipaddress.ip_address("192.168.1.1"), networks)
    assert not address_allowed(ipaddress.ip_address("127.0.0.1"), networks)


def test_a_name_is_resolved_once_and_its_address_pinned(remotes, monkeypatch):
    """The address checked is the one connected to, under the URL's own Host: a second lookup that could answer
    differently (DNS rebinding) never happens."""
    port = int(remotes[0].rsplit(":", 1)[1])
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port))]])
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: next(answers))
    assert fetch(f"http://img.test:{port}/host.txt", 1000, 10, parse_networks(["127.0.0.2/32"])) == \
        f"img.test:{port}".encode()


def test_a_name_with_any_address_not_allowed_is_refused(monkeypatch):
    found = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 80)) for address in ("8.8.8.8", "127.0.0.1")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: found)
    with pytest.raises(FetchError, match="resolves to 127.0.0.1, not a public address"):
        fetch("http://img.test/cat.png", 1000, 10)


def test_a_trickling_host_is_cut_off_at_the_deadline():
    """One byte per 0.2 s: each read is quick, so only a deadline on the whole fetch stops it."""
    class Trickle(Remote):
        def do_GET(self):
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)

    host = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Trickle)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(FetchError, match="deadline|timed out"):
            fetch(f"http://127.0.0.2:{host.server_address[1]}/", 1000, 1.0, parse_networks(["127.0.0.2/32"]))
        assert time.monotonic() - started < 3
    finally:
        host.shutdown()
        host.server_close()


def test_remote_urls_are_refused_without_allow_remote_media(plain, remotes):
    message = error_message(post(plain, with_image(plain, f"{remotes[0]}/photo.png")), 400)
    assert re.search("remote media URLs are refused.*--allow-remote-media.*send the image as a data: URL", message)


def test_loopback_is_not_fetched_without_allow_media_network(remote_only_public, remotes, normal_answer):
    server = remote_only_public
    assert re.search(GENERIC, error_message(post(server, with_image(server, f"{remotes[0]}/photo.png")), 400))
    assert_served_normally(server, normal_answer)


def test_an_image_from_an_allowed_network_answers_as_the_same_data_url(remote_127_0_0_2, remotes):
    server = remote_127_0_0_2
    answers = [post(server, with_image(server, url)) for url in (f"{remotes[0]}/photo.png", data_url(IMAGE),
                                                                 f"{remotes[0]}/hop.png")]
    assert [a.status_code for a in answers] == [200] * 3, answers[0].text
    texts = [a.json()["choices"][0]["message"]["content"] for a in answers]
    assert texts[0] == texts[1] == texts[2]


@pytest.mark.parametrize("path", ["/elsewhere.png", "/loop.png", "/missing.png", "/big.png", "/big-announced.png",
                                  "/stall.png"])
def test_a_failed_fetch_gets_one_generic_error(remote_127_0_0_2, remotes, normal_answer, path):
    """A redirect to a host not allowed (127.0.0.3), a redirect loop, a 404, a body over the limit (announced or
    not) and a host that stalls after its headers all get the same message, naming neither the cause nor the host."""
    server = remote_127_0_0_2
    reply = post(server, with_image(server, f"{remotes[0]}{path}"))
    assert re.search(GENERIC, error_message(reply, 400))
    assert reply.json()["error"]["param"] == "messages[0].content[0]"
    assert_served_normally(server, normal_answer)


def test_a_closed_port_and_a_404_are_indistinguishable(remote_127_0_0_2, remotes):
    server = remote_127_0_0_2
    replies = [post(server, with_image(server, url)) for url in (
        f"{remotes[0]}/missing.png", f"http://127.0.0.2:{closed_port('127.0.0.2')}/missing.png")]
    assert replies[0].status_code == replies[1].status_code == 400
    assert replies[0].content == replies[1].content


# --- browser attacks and HTTP framing ----------------------------------------------------------------------------

def raw_exchange(server, payload: bytes) -> tuple[int, dict, bytes]:
    """Send `payload`, read until the server closes the connection: (status, JSON body, everything it sent).
    A server that keeps the connection open fails this with a timeout."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(payload)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), httpx.Response(200, content=body).json(), reply


def raw_post(framing: bytes, body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n" + framing + b"\r\n" + body)


def foreign_origin(server):
    return httpx.get(f"{server.url}/v1/models", headers={**server.headers, "Origin": "http://evil.example"})


def foreign_host(server):
    return httpx.get(f"{server.url}/v1/models", headers={**server.headers, "Host": "evil.example"})


def text_plain(server):
    return post(server, content=b'{"model": "x"}', headers={"Content-Type": "text/plain"})


def form(server):
    return post(server, content=b"model=x", headers={"Content-Type": "application/x-www-form-urlencoded"})


def no_content_type(server):
    return httpx.post(f"{server.url}/v1/chat/completions", content=b"{}", headers=server.headers)


def length_and_chunked(server):
    """A request smuggling attempt: a proxy taking Content-Length would see one request, h11 (chunked) two."""
    return raw_exchange(server, raw_post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                                         b"0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))


def length_not_a_number(server):
    return raw_exchange(server, raw_post(b"Content-Length: +5\r\n", b"{}   "))


def lengths_that_differ(server):
    return raw_exchange(server, raw_post(b"Content-Length: 2\r\nContent-Length: 5\r\n", b"{}   "))


# case -> (status, the pattern of its message, whether the Guard counts it in /metrics)
REFUSED = {
    foreign_origin: (403, r"^requests from web pages of origin 'http://evil\.example' are refused; start the server "
                          r"with --allow-origin ORIGIN", True),
    foreign_host: (403, r"^Host 'evil\.example' is not a loopback name.*DNS rebinding.*connect via 127\.0\.0\.1 or "
                        r"localhost, or start the server with --host", True),
    text_plain: (415, r"^the body's Content-Type is 'text/plain', and only JSON is accepted; send it with "
                      r"'Content-Type: application/json'$", True),
    form: (415, r"Content-Type is 'application/x-www-form-urlencoded'", True),
    no_content_type: (415, r"Content-Type is missing", True),
    length_and_chunked: (400, r"^the request has both Content-Length and Transfer-Encoding.*send only one of them$",
                         True),
    length_not_a_number: (400, r"^malformed HTTP request .*; send one well-formed HTTP/1\.1 request$", False),
    lengths_that_differ: (400, r"^malformed HTTP request", False),
}


def errors_counted(server, status: int) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    match = re.search(rf'^mindvl_request_errors_total{{status="{status}"}} (\S+)$', text, re.M)
    return float(match[1]) if match else 0


@pytest.mark.parametrize("case, expected", REFUSED.items(), ids=[f.__name__ for f in REFUSED])
def test_browser_attacks_and_ambiguous_framing_are_refused(plain, normal_answer, case, expected):
    status, pattern, counted = expected
    before = errors_counted(plain, status)
    reply = case(plain)
    if isinstance(reply, tuple):  # raw: the server closed the connection after this one answer
        got, body, everything = reply
        assert len(re.findall(rb"HTTP/1\.1 \d{3} ", everything)) == 1, everything
    else:
        got, body = reply.status_code, reply.json()
    assert got == status, body
    assert set(body) == {"error"} and "\n" not in body["error"]["message"], body
    assert re.search(pattern, body["error"]["message"]), body["error"]["message"]
    assert errors_counted(plain, status) == before + counted
    assert_served_normally(plain, normal_answer)


def test_an_allowed_origin_gets_cors_answers(plain, normal_answer):
    preflight = httpx.options(f"{plain.url}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # no API key: browsers send none here
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0
    reply = post(plain, chat(plain), headers={"Origin": ORIGIN})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == normal_answer
    assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in reply.headers["Vary"]
    assert "Access-Control-Allow-Origin" not in post(plain, chat(plain)).headers


def test_a_loopback_host_with_a_port_is_served(plain):
    for host in (f"localhost:{plain.port}", f"127.0.0.1:{plain.port}", "localhost"):
        reply = httpx.get(f"{plain.url}/v1/models", headers={**plain.headers, "Host": host})
        assert reply.status_code == 200, (host, reply.text)
