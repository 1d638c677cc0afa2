"""One request's failure is its own. A fault injected into one row — while it is admitted, in its prefill graph
call, in its decode step, in its sampler — fails that request alone: every other row goes on and gets exactly its
single-request answer. And /health reports a worker that has work but makes no progress.

The faults are injected into this process's runtime (the package has no test hooks), with the requests' seeds
choosing which request fails where; the server runs over that runtime in a thread, speaking real HTTP.
"""

import dataclasses
import json
import threading

import httpx
import numpy as np
import pytest
from serve_helpers import DecodeGate, in_process_server, wait_for

from mindvl.runtime import Runtime
from mindvl.runtime.batch import Batch
from mindvl.runtime.sampling import Sampling

ADMIT, PREFILL, DECODE, SAMPLER = 1001, 1002, 1003, 1004  # seeds of the requests that fail, and where
NORMAL = {"Write a short poem about the sea.": 60, "Name three colours.": 40}


class Faults:
    """The runtime with faults by seed: ADMIT raises while the request is admitted; PREFILL's prompt is NaN, which
    the graph call (a stand-in for a device fault) refuses; DECODE's third token is an id no embedding has, so its
    next decode step cannot be built; SAMPLER's sampler raises at its third token. While `gate` is closed, decode
    calls wait at it (the worker is stuck)."""

    def __init__(self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = DecodeGate(runtime)
        new_generation, run = runtime.new_generation, runtime.artifacts.run

        def faulty_generation(prompt, max_new_tokens, sampling, keep_logits=False):
            if sampling.seed == ADMIT:
                raise RuntimeError("injected fault while admitting")
            if sampling.seed == PREFILL:
                prompt = dataclasses.replace(prompt, embeds=np.full_like(prompt.embeds, np.nan))
            generation = new_generation(prompt, max_new_tokens, sampling, keep_logits)
            if sampling.seed in (DECODE, SAMPLER):
                generation.take = faulty_take(generation, generation.take, sampling.seed)
            return generation

        def faulty_run(spec, inputs, *cache_set):
            if np.isnan(inputs["embeds"]).any():
                raise RuntimeError("injected device fault")
            return run(spec, inputs, *cache_set)

        monkeypatch.setattr(runtime, "new_generation", faulty_generation)
        monkeypatch.setattr(runtime.artifacts, "run", faulty_run)


def faulty_take(generation, take, seed):
    def faulty(logits):
        if len(generation.token_ids) < 2:
            return take(logits)
        if seed == SAMPLER:
            raise ValueError("injected fault in the sampler")
        generation.token_ids.append(10**9)
        return ""

    return faulty


@pytest.fixture
def runtime(batch4):
    return Runtime.load(batch4)


@pytest.fixture
def singles(runtime):
    outs = {text: runtime.generate(text, max_new_tokens=n) for text, n in NORMAL.items()}
    # Each runs to its token limit, so it is still streaming while the faults happen.
    assert all(len(out.token_ids) == NORMAL[text] for text, out in outs.items())
    return {text: out.text for text, out in outs.items()}


def test_a_fault_in_one_row_of_a_batch_fails_that_row_alone(runtime, singles, monkeypatch):
    Faults(runtime, monkeypatch)
    batch = Batch(runtime.artifacts, 4, 256)
    prompts = {text: runtime.encode(runtime.processor.prepare(text)) for text in NORMAL}

    def generation(text, seed=None):
        return runtime.new_generation(prompts[text], NORMAL[text], Sampling(seed=seed))

    poem, colours = NORMAL
    normal = [generation(poem), generation(colours)]
    faulty = [generation(poem, PREFILL), generation(colours, DECODE)]
    # One prefill call for all four rows fails on the NaN row; the rows are then run one by one.
    for g in (faulty[0], normal[0], faulty[1], normal[1]):
        batch.add(g)
    batch.step()
    assert faulty[0].finish == "error" and "injected device fault" in str(faulty[0].error)
    sampler = generation(poem, SAMPLER)
    batch.add(sampler)  # into the row the failed prefill freed
    while batch.active:
        batch.step()
    assert [g.text for g in normal] == [singles[poem], singles[colours]]
    assert isinstance(faulty[1].error, IndexError) and faulty[1].finish == "error"
    assert isinstance(sampler.error, ValueError) and len(sampler.token_ids) == 2


def stream(url: str, body: dict, out: dict, first_piece: threading.Event | None = None) -> None:
    """POST a streamed chat completion; `out` gets its text and every event."""
    out["text"], out["events"] = "", []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as reply:
        out["status"] = reply.status_code
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            out["events"].append(event)
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                out["text"] += event["choices"][0]["delta"]["content"]
                if first_piece:
                    first_piece.set()


def test_a_fault_in_one_request_fails_it_alone_while_the_others_stream(runtime, singles, monkeypatch):
    faults = Faults(runtime, monkeypatch)
    poem, colours = NORMAL
    replies = {name: {} for name in ("poem", "colours", ADMIT, PREFILL, DECODE, SAMPLER)}
    with in_process_server(runtime, model_name="faulty") as server:
        def body(text, seed=None):
            return {"model": "faulty", "messages": [{"role": "user", "content": text}], "max_tokens": NORMAL[text],
                    "seed": seed}

        def admit():
            replies[ADMIT]["reply"] = httpx.post(f"{server.url}/v1/chat/completions", json=body(colours, ADMIT),
                                                 timeout=300)

        # The poem prefills, then the worker waits in its first decode step while every other request queues,
        # so they all join the batch next to the streaming poem when the gate opens.
        with faults.gate.closed():
            clients = [threading.Thread(target=stream, args=(server.url, body(poem), replies["poem"]))]
            clients[0].start()
            assert faults.gate.holding.wait(120)
            clients += [threading.Thread(target=stream, args=(server.url, body(colours), replies["colours"])),
                        threading.Thread(target=admit)]
            clients += [threading.Thread(target=stream, args=(server.url, body(text, seed), replies[seed]))
                        for text, seed in ((poem, PREFILL), (colours, DECODE), (poem, SAMPLER))]
            for client in clients[1:]:
                client.start()
            wait_for(lambda: server.metric("mindvl_queue_depth") == 5)
        for client in clients:
            client.join(300)

        assert replies["poem"]["text"] == singles[poem] and replies["colours"]["text"] == singles[colours]
        assert replies[ADMIT]["reply"].status_code == 500
        assert "generation failed inside the server for this request" in replies[ADMIT]["reply"].text
        for seed in (PREFILL, DECODE, SAMPLER):
            errors = [e["error"] for e in replies[seed]["events"] if "error" in e]
            assert len(errors) == 1 and errors[0]["message"].startswith("generation failed inside the server")
        assert server.metric("mindvl_worker_failures_total") == 4
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": "faulty", "queue_depth": 0,
                                                           "running": 0}


def test_health_fails_while_the_worker_makes_no_progress(runtime, singles, monkeypatch):
    faults = Faults(runtime, monkeypatch)
    poem = next(iter(NORMAL))
    with in_process_server(runtime, model_name="faulty", stall_timeout=0.5) as server:
        health = f"{server.url}/health"
        assert httpx.get(health).status_code == 200  # idle is not stuck, however long
        reply = {}
        client = threading.Thread(target=stream, args=(server.url, {"model": "faulty", "max_tokens": NORMAL[poem],
                                  "messages": [{"role": "user", "content": poem}]}, reply))
        with faults.gate.closed():
            client.start()
            assert faults.gate.holding.wait(120)
            wait_for(lambda: httpx.get(health).status_code == 503)
            message = httpx.get(health).json()["error"]["message"]
            assert "made no progress for" in message and "1 requests waiting" in message
        client.join(300)
        assert reply["text"] == singles[poem]
        assert httpx.get(health).status_code == 200
