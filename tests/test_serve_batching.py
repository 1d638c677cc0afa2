"""Static-shape continuous batching: several requests share one batch-4 decode, joining and leaving at any step,
and each gets exactly the tokens it gets alone (`Runtime.generate`, batch 1); then the same through a live server
under load: 200 requests from 32 concurrent clients, none lost, every answer equal to its single-request answer.
"""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from media import sample_image, write_sample_video
from serve_helpers import running_server, user_message

from mindvl.runtime import Runtime
from mindvl.runtime.batch import Batch
from mindvl.runtime.sampling import Sampling

# (text, images, video file or None, max_new_tokens); the last needs the 512-slot cache, the others fit 256.
REQUESTS = [
    ("Write a short poem about the sea.", [], None, 12),
    ("Describe this image.", [sample_image(224, 224, seed=11)], None, 20),
    ("What happens in this video?", [], "clip.mp4", 16),
    ("Compare the two pictures.", [sample_image(224, 224, seed=12), sample_image(112, 112, seed=13)], None, 8),
    ("Name three colours.", [], None, 24),
    ("Count: " + "one two three " * 10, [], None, 150),
]


@pytest.fixture(scope="module")
def artifacts(batch4):
    return batch4


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    write_sample_video(folder / "clip.mp4", frames=8, size=(112, 112))
    return folder


@pytest.fixture(scope="module")
def runtime(artifacts):
    return Runtime.load(artifacts)


@pytest.fixture(scope="module")
def singles(runtime, media):
    """Each request's greedy token ids and text alone, at batch 1."""
    outs = [runtime.generate(text, images=images, videos=[media / video] if video else [], max_new_tokens=n)
            for text, images, video, n in REQUESTS]
    return [(out.token_ids, out.text) for out in outs]


def generation(runtime, media, i):
    text, images, video, n = REQUESTS[i]
    prepared = runtime.processor.prepare(text, images, [media / video] if video else [])
    return runtime.new_generation(runtime.encode(prepared), n, Sampling())


def run_to_end(batch):
    while batch.active:
        batch.step()


def add(batch, generations):
    for g in generations:
        batch.add(g)


def test_a_full_batch_answers_as_each_request_alone(runtime, media, singles):
    batch = Batch(runtime.artifacts, 4, 512)
    generations = [generation(runtime, media, i) for i in range(4)]
    add(batch, generations)
    run_to_end(batch)
    assert [g.token_ids for g in generations] == [singles[i][0] for i in range(4)]
    assert [g.text for g in generations] == [singles[i][1] for i in range(4)]


def test_requests_join_and_leave_a_running_batch(runtime, media, singles):
    batch = Batch(runtime.artifacts, 4, 512)
    first = [generation(runtime, media, i) for i in (0, 1)]
    add(batch, first)
    for _ in range(3):
        batch.step()
    later = [generation(runtime, media, i) for i in (2, 3)]
    add(batch, later)  # rows 0 and 1 idle through this prefill, mid-generation
    batch.step()
    batch.remove(first[1])  # cancelled: its row is free for the next request
    last = generation(runtime, media, 5)
    batch.add(last)
    run_to_end(batch)
    assert [g.token_ids for g in (first[0], *later, last)] == [singles[i][0] for i in (0, 2, 3, 5)]
    assert first[1].token_ids == singles[1][0][: len(first[1].token_ids)]


def ask(server, i):
    text, images, video, n = REQUESTS[i]
    body = {"model": server.model, "messages": user_message(text, images, [video] if video else []), "max_tokens": n}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_200_requests_from_32_clients_each_get_their_single_answer(artifacts, media, singles, tmp_path):
    with running_server(artifacts, tmp_path, "--media-dir", str(media)) as server:
        with ThreadPoolExecutor(32) as clients:
            replies = list(clients.map(lambda k: ask(server, k % len(REQUESTS)), range(200)))
        assert len(replies) == 200
        for k, reply in enumerate(replies):
            _, text = singles[k % len(REQUESTS)]
            assert reply["choices"][0]["message"]["content"] == text, f"request {k}"
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": server.model,
                                                             "queue_depth": 0, "running": 0}
        assert server.metric("mindvl_decode_rows_total") > server.metric("mindvl_decode_steps_total")
