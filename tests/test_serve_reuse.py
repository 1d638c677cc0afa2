"""Prefix reuse, the vision cache and chunked prefill through `mindvl serve`, with the official `openai` client.

A three-turn chat about one image, each turn resending the whole history: turns 2 and 3 report the history the
server held already as `usage.prompt_tokens_details.cached_tokens` (streamed or not), and every answer is the one
a runtime without any cache gives. A long prompt prefilled in chunks while other requests decode: between two of its
chunk calls every decoding row takes a token, and every answer is its single-request answer.

The server runs an artifact with small prefill buckets, so that ordinary prompts are prefilled in several chunks, and
batch 4; the reference answers come from the `tiny` export, whose prefill buckets hold every prompt whole.
"""

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import openai
import pytest
from conftest import SMALL_PREFILL_SPEC, export_tiny
from media import sample_image
from serve_helpers import DecodeGate, in_process_server, running_server, user_message, wait_for

from mindvl.runtime import Runtime
from mindvl.shapes.buckets import BucketSpec, choose_text_buckets

SPEC = {**SMALL_PREFILL_SPEC, "batch": [1, 4]}  # the reuse tests' buckets (tests/test_reuse.py), at batch 4
SERVED = BucketSpec.from_dict(SPEC)
IMAGE, OTHER_IMAGE = sample_image(112, 112, seed=31), sample_image(112, 112, seed=32)
QUESTIONS = ("Describe this image.", "Which colour is most common?", "Anything else?")
NEW_TOKENS = 16  # with the 112x112 image, all three turns fit the 256-slot cache: reuse stays within one bucket


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory):
    return export_tiny(checkpoint, tmp_path_factory, "reuse-batch4", SPEC)


@pytest.fixture(scope="module")
def cold(exported):
    """The answers without any cache, from the same checkpoint at the `tiny` preset, whose prefill buckets hold
    every prompt here whole: no prefix reused, no image from a cache, no chunks."""
    return Runtime.load(exported("tiny")[1], prefix_cache_mb=0, vision_cache_mb=0)


def ask(client, model, messages, stream, max_tokens=NEW_TOKENS):
    """The answer's text and usage, streamed (usage from the last chunk, as `include_usage` asks) or not."""
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        return reply.choices[0].message.content, reply.usage
    *chunks, last = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   stream=True, stream_options={"include_usage": True})
    assert last.choices == []
    return "".join(c.choices[0].delta.content or "" for c in chunks), last.usage


def template_turn(message):
    """An OpenAI message as `Runtime.chat` takes it: an image part becomes {"type": "image"}."""
    if isinstance(message["content"], str):
        return message
    return {**message, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in message["content"]]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_chat_reuses_its_history_and_answers_as_without_cache(artifacts, cold, stream, tmp_path):
    warm = Runtime.load(artifacts)  # the Python API with its caches: the reuse a fresh server must report
    with running_server(artifacts, tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        history, cached, prompt_tokens = [], [], []
        for turn, question in enumerate(QUESTIONS):
            history += user_message(question, [IMAGE] if turn == 0 else [])
            text, usage = ask(client, server.model, history, stream)
            turns = [template_turn(m) for m in history]
            expected = cold.chat(turns, [IMAGE], max_new_tokens=NEW_TOKENS)
            reused = warm.chat(turns, [IMAGE], max_new_tokens=NEW_TOKENS)
            assert expected.prefill_chunks == 1 and text == expected.text == reused.text, f"turn {turn + 1}"
            assert usage.prompt_tokens == expected.prompt_tokens
            assert usage.completion_tokens == len(expected.token_ids)
            assert usage.prompt_tokens_details.cached_tokens == reused.prompt_tokens_reused, f"turn {turn + 1}"
            cached.append(usage.prompt_tokens_details.cached_tokens)
            prompt_tokens.append(usage.prompt_tokens)
            history.append({"role": "assistant", "content": text})
        # Turn 1 finds nothing; each later turn finds at least the whole previous prompt, its image included.
        assert cached[0] == 0 and cached[1] >= prompt_tokens[0] and cached[2] >= prompt_tokens[1], cached

        # A new conversation about the same image and another one, with words before them: its prompt leaves the
        # chat's before the first image, so both images are encoded, the chat's from the vision cache.
        fresh = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, *user_message(
            "Are these the same?", [IMAGE, OTHER_IMAGE])[0]["content"]]}]
        text, usage = ask(client, server.model, fresh, stream)
        expected = cold.chat([template_turn(fresh[0])], [IMAGE, OTHER_IMAGE], max_new_tokens=NEW_TOKENS)
        assert text == expected.text and usage.prompt_tokens_details.cached_tokens < prompt_tokens[0]
        cached.append(usage.prompt_tokens_details.cached_tokens)
        prompt_tokens.append(usage.prompt_tokens)

        assert server.metric("mindvl_prefix_hits_total") == sum(c > 0 for c in cached) >= 2
        assert server.metric("mindvl_prefix_reused_tokens_total") == sum(cached)
        assert server.metric("mindvl_vision_cache_hits_total") == 1
        # Every chunk is a prefill call: what each prompt left to prefill took one or more (the first turn's, more).
        chunks = [choose_text_buckets(n, NEW_TOKENS, SERVED, 4, reused=c).calls for n, c in zip(prompt_tokens, cached,
                                                                                               strict=True)]
        assert server.metric("mindvl_prefill_calls_total") == sum(map(len, chunks)) > len(chunks)


def test_two_chats_taking_turns_each_reuse_their_own_history(artifacts):
    # Both chats share the system prompt: a new chat must take a row that keeps nothing (batch 4 has them), not the
    # other chat's row, whose history the other chat's next turn needs.
    with in_process_server(Runtime.load(artifacts)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        chats = [(IMAGE, []), (OTHER_IMAGE, [])]
        previous = [0, 0]  # each chat's last prompt, in tokens
        for turn, question in enumerate(QUESTIONS[:2]):
            for i, (image, history) in enumerate(chats):
                history += user_message(question, [image] if turn == 0 else [])
                text, usage = ask(client, server.model, history, stream=False)
                # The chat's previous prompt is still held: the other chat had rows of its own to take.
                assert usage.prompt_tokens_details.cached_tokens >= previous[i], f"chat {i + 1}, turn {turn + 1}"
                previous[i] = usage.prompt_tokens
                history.append({"role": "assistant", "content": text})


def record_text_calls(runtime):
    """Every text graph call of `runtime`, in order: its kind, and each decoding row's generation with the number
    of tokens it had then. Wraps `runtime.artifacts.run` (outside any gate already wrapped around it)."""
    calls, run = [], runtime.artifacts.run

    def recorded(spec, inputs, cache_set=0):
        if spec.kind in ("prefill", "decode"):
            batch = runtime.pool.sets[spec.bucket["batch"], spec.bucket["cache"]][cache_set]
            calls.append((spec.kind, {g: len(g.token_ids) for g in batch.active if not g.prefilling}))
        return run(spec, inputs, cache_set)

    runtime.artifacts.run = recorded
    return calls


# Short prompts that decode long (one prefill call each), and a prompt several chunks long; all fit one 256 cache.
DECODERS = {"Hi.": 40, "Go on.": 40, "Sing.": 40}
LONG, LONG_TOKENS = "Tell me a story. " * 12, 8


def test_a_prompt_prefilled_in_chunks_interleaves_with_decoding_rows(artifacts, cold):
    runtime = Runtime.load(artifacts)
    gate = DecodeGate(runtime)
    calls = record_text_calls(runtime)
    requests = {**DECODERS, LONG: LONG_TOKENS}
    singles = {text: cold.generate(text, max_new_tokens=n) for text, n in requests.items()}
    # The decoders are still decoding while every chunk of the long prompt runs.
    assert all(len(singles[text].token_ids) == n for text, n in DECODERS.items())
    long_calls = choose_text_buckets(singles[LONG].prompt_tokens, LONG_TOKENS, runtime.buckets, 4).calls
    assert len(long_calls) == 4 and singles[LONG].prefill_chunks == 1

    with in_process_server(runtime) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def submitted():
            return server.metric("mindvl_running_sequences") + server.metric("mindvl_queue_depth")

        with ThreadPoolExecutor(len(requests)) as clients, gate.closed():
            # The decoders start and the worker holds in a decode step; the long prompt queues behind it, so when
            # the gate opens it is prefilled while they decode, however fast the machine.
            answers = {text: clients.submit(ask, client, server.model, user_message(text), True, n)
                       for text, n in DECODERS.items()}
            assert gate.holding.wait(120)
            wait_for(lambda: submitted() == len(DECODERS))
            answers[LONG] = clients.submit(ask, client, server.model, user_message(LONG), True, LONG_TOKENS)
            wait_for(lambda: submitted() == len(requests))
        for text, answer in answers.items():
            assert answer.result(300)[0] == singles[text].text, text

        prefills = [decoding for kind, decoding in calls if kind == "prefill"]
        assert server.metric("mindvl_prefill_calls_total") == len(prefills)
        assert server.metric("mindvl_decode_steps_total") == len(calls) - len(prefills)

    # The interleaving rule: while rows are decoding, a prefill call follows a decode step, never another prefill
    # call, and every row decoding at two consecutive prefill calls took a token between them.
    for (kind, _), (next_kind, decoding) in pairwise(calls):
        assert kind == "decode" or next_kind == "decode" or not decoding, calls
    for before, after in pairwise(prefills):
        assert all(after[g] > before[g] for g in before.keys() & after.keys()), prefills
    # Every chunk of the long prompt ran while the decoders decoded.
    assert sum(bool(decoding) for decoding in prefills) >= len(long_calls)
