"""Hostile and broken requests to a live `mindvl serve`: each gets the right status and an OpenAI-style JSON error
whose one-line message names the problem and the fix, and the next normal request is still answered correctly.

The server runs with an API key, a media folder (holding a symlink that points out of it, a text file named like
a video, and a file larger than the server reads), a 1 MB body limit, a 20 KB media file limit, a 2 s request
timeout and at most 2 requests in flight. No error message may show a path of the server's disk.

Clients that leave, and requests past the limit, meet the same app served in the test's process, whose decode steps
wait at a gate the test opens: a generation cannot end before the client has acted, however fast the machine.
"""

import contextlib
import io
import json
import re
import socket

import httpx
import pytest
from media import b64, png_bomb, png_header_only, sample_image
from serve_helpers import DecodeGate, in_process_server, running_server, user_message, wait_for

from mindvl.runtime import Runtime

KEY = "test-key-5f2b"
TIMEOUT_S = 2
NORMAL = "Say something."


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "media").mkdir()
    sample_image(112, 112, seed=1).save(root / "outside.png")
    (root / "media" / "escape.png").symlink_to(root / "outside.png")
    (root / "media" / "notes.mp4").write_text("no frames here")
    (root / "media" / "huge.png").write_bytes(bytes(40_000))
    return root / "media"


@pytest.fixture(scope="module")
def server(exported, media):
    with running_server(exported("tiny")[1], media.parent, "--media-dir", str(media), "--api-key", KEY,
                        "--max-body-mb", "1", "--request-timeout", str(TIMEOUT_S), "--max-concurrency", "2",
                        "--max-media-mb", "0.02") as server:
        yield server


@pytest.fixture(scope="module")
def normal_answer(exported):
    return Runtime.load(exported("tiny")[1]).generate(NORMAL, max_new_tokens=8).text


def post(server, body=None, *, content=None, key=KEY, headers=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
               **(headers or {})}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, content=content, headers=headers, timeout=60)


def chat(server, messages=None, **fields):
    return {"model": server.model, "messages": messages or user_message("Hi."), "max_tokens": 4, **fields}


def with_image(server, url):
    return chat(server, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is it?"}]}])


def raw_exchange(server, payload: bytes) -> tuple[int, dict]:
    """Send `payload` and then nothing more (a slow-loris client); the server must answer and close by itself."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10 * TIMEOUT_S) as s:
        s.sendall(payload)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), httpx.Response(200, content=body).json()


# --- cases: each returns (status, JSON body) ----------------------------------------------------------------------

def malformed_json(server, media):
    return post(server, content=b'{"model": "x", "messages": [')


def body_is_a_list(server, media):
    return post(server, content=b"[1, 2]")


def wrong_type(server, media):
    return post(server, chat(server, max_tokens="5"))


def content_of_wrong_type(server, media):
    return post(server, chat(server, [{"role": "user", "content": 5}]))


def missing_messages(server, media):
    return post(server, {"model": server.model})


def zero_max_tokens(server, media):
    return post(server, chat(server, max_tokens=0))


def huge_body(server, media):
    return post(server, content=b" " * (2 * 2**20))


def huge_chunked_body(server, media):  # no Content-Length: counted as it arrives
    return post(server, content=iter([b" " * 2**16] * 32))


def invalid_base64(server, media):
    return post(server, with_image(server, "data:image/png;base64,iVBORw0KGgo***not-base64***"))


def png_bomb_image(server, media):
    return post(server, with_image(server, b64(png_bomb())))


def not_an_image(server, media):
    return post(server, with_image(server, b64(bytes(range(256)) * 8)))


def unsupported_media_type(server, media):
    return post(server, with_image(server, b64(b"<html></html>", "text/html")))


def path_traversal(server, media):
    return post(server, with_image(server, "../../etc/passwd"))


def absolute_path(server, media):
    return post(server, with_image(server, "/etc/passwd"))


def symlink_out_of_media_dir(server, media):
    return post(server, with_image(server, "escape.png"))


def missing_media_file(server, media):
    return post(server, with_image(server, "nothing-here.png"))


def remote_url(server, media):
    return post(server, with_image(server, "http://127.0.0.1:9/cat.png"))


def file_url(server, media):
    return post(server, with_image(server, "file:///etc/passwd"))


def video_as_data_url(server, media):
    return post(server, chat(server, [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]))


def images_beyond_the_prompt_counted_from_headers(server, media):
    # 8 images of 224x224 are 8 x 64 visual tokens, past the largest cache (512): refused before decoding, which
    # would fail on these header-only PNGs.
    parts = [{"type": "image_url", "image_url": {"url": b64(png_header_only(224, 224))}}] * 8
    return post(server, chat(server, [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare."}]}]))


def too_many_images(server, media):
    parts = [{"type": "image_url", "image_url": {"url": b64(png_header_only(28, 28))}}] * 17
    return post(server, chat(server, [{"role": "user", "content": parts}]))


def too_many_videos(server, media):
    return post(server, chat(server, [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "clip.mp4"}}] * 3}]))


def too_many_parts(server, media):
    return post(server, chat(server, [{"role": "user", "content": [{"type": "text", "text": "a"}] * 65}]))


def too_much_text(server, media):
    return post(server, chat(server, user_message("x" * 10_000)))


def eps_claiming_to_be_png(server, media):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    return post(server, with_image(server, b64(eps)))


def tiff_image(server, media):
    buffer = io.BytesIO()
    sample_image(28, 28, seed=3).save(buffer, format="TIFF")
    return post(server, with_image(server, b64(buffer.getvalue())))


def media_file_too_large(server, media):
    return post(server, with_image(server, "huge.png"))


def text_file_as_video(server, media):
    return post(server, chat(server, [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "notes.mp4"}}, {"type": "text", "text": "What happens?"}]}]))


def malformed_url(server, media):
    return post(server, with_image(server, "http://[::1"))


def file_name_too_long(server, media):
    return post(server, with_image(server, "a" * 5000 + ".png"))


def lone_surrogate_in_text(server, media):
    body = json.dumps(chat(server, user_message("Hi."))).replace("Hi.", "Hi \\ud800.")
    return post(server, content=body.encode())


def lone_surrogate_in_file_name(server, media):
    body = json.dumps(with_image(server, "cat.png")).replace("cat.png", "cat\\udc80.png")
    return post(server, content=body.encode())


def negative_seed(server, media):
    return post(server, chat(server, seed=-1, temperature=0.7))


def seed_beyond_64_bits(server, media):
    return post(server, chat(server, seed=2**64, temperature=0.7))


def top_p_above_one(server, media):
    return post(server, chat(server, top_p=1.5, temperature=0.7))


def too_many_stops(server, media):
    return post(server, chat(server, stop=["a", "b", "c", "d", "e"]))


def stop_too_long(server, media):
    return post(server, chat(server, stop="ab" * 200_000))


def prompt_beyond_every_bucket(server, media):
    return post(server, chat(server, user_message("word " * 300)))


def max_tokens_beyond_the_cache(server, media):
    return post(server, chat(server, max_tokens=1000))


def wrong_api_key(server, media):
    return post(server, chat(server), key="not-the-key")


def no_api_key(server, media):
    return post(server, chat(server), key=None)


def unknown_model(server, media):
    return post(server, chat(server, model="gpt-4o"))


def several_choices(server, media):
    return post(server, chat(server, n=3))


def misspelt_field(server, media):
    return post(server, chat(server, max_token=3))


def unknown_path(server, media):
    return httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"})


def wrong_method(server, media):
    return httpx.delete(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})


def slow_headers(server, media):
    return raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")


def slow_body(server, media):
    return raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                                + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                                + b"{\"model\": ")


# case -> (status, patterns the error message must contain: the problem, then the fix)
HOSTILE = {
    malformed_json: (400, [r"the body is not valid JSON \(.*\)", "send a JSON object"]),
    body_is_a_list: (400, ["the body is a JSON list, not an object", '"messages"']),
    wrong_type: (422, [r'^max_tokens: Input should be a valid integer, got "5"$']),
    content_of_wrong_type: (422, [r"^messages\[0\]\.content: Input should be a valid string, got 5$"]),
    missing_messages: (422, ["^messages: Field required$"]),
    zero_max_tokens: (400, ["^max_tokens: Input should be greater than or equal to 1, got 0$"]),
    huge_body: (413, [r"is 2097152 bytes, more than the 1048576 allowed \(--max-body-mb\)", "send smaller"]),
    huge_chunked_body: (413, [r"is over \d+ bytes, more than the 1048576 allowed", "send smaller"]),
    invalid_base64: (400, [r"messages\[0\]\.content\[0\]: the data: URL's payload is not valid base64",
                           "encode the file's bytes with standard base64"]),
    png_bomb_image: (413, [r"image is 8000x8000 = 64000000 pixels, more than the 16777216 allowed", "downscale it"]),
    not_an_image: (400, [r"messages\[0\]\.content\[0\]: not an image in a format mindvl reads "
                         r"\(PNG, JPEG, WebP, GIF or BMP\)", "convert it to PNG or JPEG"]),
    unsupported_media_type: (400, ["unsupported media type 'text/html' in a data: URL", "send one of image/png"]),
    path_traversal: (400, [r"'\.\./\.\./etc/passwd' is not a plain relative file name", "without '\\.\\.'"]),
    absolute_path: (400, ["'/etc/passwd' is not a plain relative file name", "name a file inside the media folder"]),
    symlink_out_of_media_dir: (400, [r"'escape\.png' leads out of the media folder", "name a file that is inside"]),
    missing_media_file: (404, [r"'nothing-here\.png' is not a file in the media folder", "check the name"]),
    remote_url: (400, ["remote media URLs are refused", "--allow-remote-media", "send the image as a data: URL"]),
    file_url: (400, ["file: URLs are not served", "send a data: URL or a file name inside"]),
    video_as_data_url: (400, ["a video is taken by its file name inside the server's --media-dir, not as a URL"]),
    images_beyond_the_prompt_counted_from_headers: (400, [r"the prompt is \d+ tokens, more than this server's "
                                                          r"largest KV cache \(512 tokens\) holds",
                                                          "send fewer or smaller images"]),
    too_many_images: (400, ["the request has 17 images, more than the 16 this server takes per request "
                            r"\(--max-images\); send fewer"]),
    too_many_videos: (400, [r"3 videos, more than the 2 .* \(--max-videos\)"]),
    too_many_parts: (400, [r"65 content parts, more than the 64 .* \(--max-parts\)"]),
    too_much_text: (400, [r"10\d\d\d characters of text, more than the 8192 .* \(--max-text-chars\)"]),
    eps_claiming_to_be_png: (400, ["not an image in a format mindvl reads", "convert it to PNG or JPEG"]),
    tiff_image: (400, ["not an image in a format mindvl reads", "convert it to PNG or JPEG"]),
    media_file_too_large: (413, [r"'huge\.png' is 40000 bytes, more than the 20971 this server reads "
                                 r"\(--max-media-mb\)", "send a smaller file"]),
    text_file_as_video: (400, [r"messages\[0\]\.content\[0\]: notes\.mp4: not a video", "convert it to MP4"]),
    malformed_url: (400, [r"messages\[0\]\.content\[0\]: malformed URL", "send a data: URL"]),
    file_name_too_long: (400, [r"cannot name a file here \(File name too long\)", "check the name"]),
    lone_surrogate_in_text: (400, [r"messages\[0\]\.content\[0\]\.text: not valid Unicode text \(a lone "
                                   r"surrogate at character 3\)", "send UTF-8 text"]),
    lone_surrogate_in_file_name: (400, [r"image_url\.url: not valid Unicode text", "send UTF-8 text"]),
    negative_seed: (400, ["^seed: Input should be greater than or equal to 0, got -1$"]),
    seed_beyond_64_bits: (400, ["^seed: Input should be less than or equal to 18446744073709551615"]),
    top_p_above_one: (400, ["^top_p: Input should be less than or equal to 1, got 1.5$"]),
    too_many_stops: (400, ["^stop: 5 stop strings; send at most 4$"]),
    stop_too_long: (400, ["^stop: String should have at most 256 characters"]),
    prompt_beyond_every_bucket: (400, [r"the prompt is 15\d\d tokens, more than this server's largest KV cache "
                                       r"\(512 tokens\) holds with room for an answer", "shorten it"]),
    max_tokens_beyond_the_cache: (400, [r"max_tokens \(1000\) is more than this server's largest KV cache \(512",
                                        r"lower max_tokens to <= \d+"]),
    wrong_api_key: (401, ["missing or wrong API key", "Authorization: Bearer KEY"]),
    no_api_key: (401, ["missing or wrong API key"]),
    unknown_model: (404, ["model 'gpt-4o' does not exist", r"GET /v1/models"]),
    several_choices: (400, ["n=3 is not supported", "send separate requests"]),
    misspelt_field: (400, ["unsupported field 'max_token'", "did you mean 'max_tokens'"]),
    unknown_path: (404, ["GET /v1/completions: not found", "POST /v1/chat/completions"]),
    wrong_method: (405, ["DELETE /v1/chat/completions: method not allowed"]),
    slow_headers: (408, [f"the request headers did not arrive within {TIMEOUT_S} s", "without pausing"]),
    slow_body: (408, [f"the request body did not arrive within {TIMEOUT_S} s", "without pausing"]),
}


def assert_served_normally(server, answer):
    reply = post(server, chat(server, user_message(NORMAL), max_tokens=8))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == answer


@pytest.mark.parametrize("case, expected", HOSTILE.items(), ids=[f.__name__ for f in HOSTILE])
def test_hostile_request_gets_its_status_and_a_one_line_error(server, media, normal_answer, case, expected):
    status, patterns = expected
    reply = case(server, media)
    got, body = reply if isinstance(reply, tuple) else (reply.status_code, reply.json())
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    message = body["error"]["message"]
    assert "\n" not in message and "Traceback" not in message
    assert str(media.parent) not in message and str(media.resolve().parent) not in message, "a path of the server"
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert_served_normally(server, normal_answer)


@pytest.fixture(scope="module")
def gated(exported):
    """The same artifacts served in this process (API key, at most 2 requests in flight) over a runtime whose decode
    steps wait while its gate is closed: a generation held there cannot end before the client has acted."""
    runtime = Runtime.load(exported("tiny")[1])
    gate = DecodeGate(runtime)
    with in_process_server(runtime, api_key=KEY, max_concurrency=2) as server:
        yield server, gate


def dropped(server, cancelled_before: float) -> bool:
    """The one request generating was cancelled and its row freed."""
    return (server.metric("mindvl_cancelled_total"), server.metric("mindvl_running_sequences")) == (
        cancelled_before + 1, 0)


def test_client_leaving_mid_stream_stops_its_generation(gated, normal_answer):
    server, gate = gated
    cancelled = server.metric("mindvl_cancelled_total")
    with gate.closed():
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat(server, max_tokens=64, stream=True),
                          headers=server.headers, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the stream has begun (kept open: `lines` is not closed yet)
            assert gate.holding.wait(120)  # generating: admitted, prefilled, held in its first decode step
        wait_for(lambda: server.metric("mindvl_requests_in_flight") == 0)  # the server has seen the client leave
    # The held step ends with 62 of the 64 tokens to go: the next step must drop the request.
    wait_for(lambda: dropped(server, cancelled))
    assert_served_normally(server, normal_answer)


def test_client_leaving_before_a_plain_answer_stops_its_generation(gated, normal_answer):
    server, gate = gated
    cancelled = server.metric("mindvl_cancelled_total")
    body = httpx.Request("POST", "http://x", json=chat(server, max_tokens=64)).content
    with gate.closed():
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
            assert gate.holding.wait(120)  # generating: admitted, prefilled, held in its first decode step
        wait_for(lambda: server.metric("mindvl_requests_in_flight") == 0)  # the server has seen the client leave
    wait_for(lambda: dropped(server, cancelled))
    assert_served_normally(server, normal_answer)


def test_requests_past_the_limit_get_429_with_retry_after(gated, normal_answer):
    server, gate = gated
    with gate.closed(), contextlib.ExitStack() as held:  # neither request can finish while the third arrives
        for _ in range(2):  # the server's max_concurrency
            response = held.enter_context(httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=chat(server, max_tokens=64, stream=True),
                headers=server.headers, timeout=60))
            lines = response.iter_lines()
            next(lines)  # its response has started, so it is in flight (kept open: `lines` is not closed yet)
            held.callback(lines.close)
        refused = post(server, chat(server))
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert re.search("2 requests in flight, its limit .* retry after", refused.json()["error"]["message"])
    wait_for(lambda: server.metric("mindvl_requests_in_flight") == 0)
    assert_served_normally(server, normal_answer)
