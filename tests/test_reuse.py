"""Chunked prefill, prefix reuse and the vision cache, token for token against transformers.

The tiny checkpoint is exported with prefill buckets of 32 and 64 tokens and caches of 256 and 512 (conftest
SMALL_PREFILL_SPEC), so ordinary prompts are prefilled in 2-5 chunks, and a short chat stays in one 256-slot cache
from turn to turn, where its history can be reused.

Tolerances. Against transformers (its own processor builds the inputs, tests/reference.py): identical greedy ids,
its top-2 margin > 1e-3 at every step so that a near tie cannot decide the comparison, and logits at every step
within 1e-4 × max|logit| of its forward over the prompt and the answer (measured <= 8e-6), since a slightly wrong
cache can still give the same ids. Between two runs of our runtime that compute a prompt in different calls (reused
or not, chunked differently): within 1e-5 × max|logit| (identical on CPU, but the order of the sums may change
elsewhere). Between two runs that make the same calls: identical.

What a cache row may serve of a prompt is modelled here, apart from the runtime: the row holds what was fed through
it (a prompt, then every generated token but the last), and a later prompt may reuse the longest prefix the two
share, an image's tokens counting as equal only where the same image stands, and never the prompt's last token
(whose logits the prefill must give). Token ids come from transformers' processor.
"""

import copy
import functools
import json
import math

import numpy as np
import pytest
from conftest import SMALL_PREFILL_SPEC
from media import sample_image, video_frames
from reference import hf_chat_inputs, hf_greedy, hf_inputs, hf_logits

from mindvl.apps.cli import main
from mindvl.runtime import Runtime
from mindvl.shapes.buckets import BucketSpec, choose_text_buckets
from mindvl.shapes.prompt import user_turn

SPEC = BucketSpec.from_dict(SMALL_PREFILL_SPEC)
CHUNK = SPEC.prefill[-1]
NEW_TOKENS = 8  # per answer: decoding after every kind of prefill is seen, and a three-turn chat fits 256 slots
STORY = ("The lighthouse keeper wrote down every ship that passed the point: its flag, its sails, the hour, and "
         "whether the wind had turned. In the long winter he counted gulls instead, and the storms that broke the "
         "ice on the rocks below. When the supply boat came in spring, he gave the captain his notebooks, and asked "
         "for nothing but lamp oil, tea and a new pencil.")
# 224x224 is 64 visual tokens: after the system prompt they straddle the first chunk boundary. With this seed the
# random model's answers begin with text that encodes back to the same tokens, so a next turn reuses some of them.
IMAGE = sample_image(224, 224, seed=47)
QUESTIONS = ("What is in this picture?", "Which colour is most common?", "Is there a face in it?")


def assert_answers_as_transformers(model_dir, inputs, out):
    """`out` (with logits) is transformers' greedy answer to the model inputs, whose margin is clear, and its logits
    are transformers' at every step within 1e-4 × max|logit| (ids alone would let a slightly wrong cache pass)."""
    expected, margin = hf_greedy(model_dir, inputs, max_new_tokens=NEW_TOKENS)
    assert margin > 1e-3, "the reference nearly ties: change the prompt"
    assert out.token_ids == expected[0].tolist()
    sequence = np.concatenate([inputs["input_ids"], np.asarray([out.token_ids[:-1]], np.int64)], axis=1)
    full = hf_logits(model_dir, {**inputs, "input_ids": sequence, "attention_mask": np.ones_like(sequence)})
    assert_logits_close(out.logits, full[0, inputs["input_ids"].shape[1] - 1:], rel=1e-4)


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@functools.cache
def image_pad(model_dir):
    return json.loads((model_dir / "config.json").read_text())["image_token_id"]


def tagged(model_dir, ids, image):
    """A prompt's token ids as prefix reuse may compare them: the pads of the one image it shows (the tests' prompts
    show at most one) made unequal to any other image's; `image` is a number that names that image."""
    return np.where(ids == image_pad(model_dir), -1 - image, ids)


def held(prompt_keys, out):
    """What a cache row holds after answering: the prompt, then every generated token but the last (never fed)."""
    return np.concatenate([prompt_keys, out.token_ids[:-1]])


def reusable(prompt_keys, row):
    """How many leading prompt tokens a row holding `row` may serve."""
    n = min(len(prompt_keys), len(row))
    differ = np.flatnonzero(prompt_keys[:n] != row[:n])
    return min(int(differ[0]) if len(differ) else n, len(prompt_keys) - 1)


def chunks(prompt_tokens, reused=0):
    """The prefill calls the text policy plans for the part of the prompt the cache does not hold."""
    return choose_text_buckets(prompt_tokens, NEW_TOKENS, SPEC, reused=reused).calls


def assert_logits_close(actual, expected, rel=1e-5):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err, scale = np.abs(a - e).max(), np.abs(e).max()
        assert err <= rel * scale, f"step {step}: max|Δ| {err:.3g} > {rel} × max|logit| {scale:.3g}"


def converse(runtime, order, images, **settings):
    """Conversations about one image each (`images` by name), a turn of the one named next in `order` at a time,
    each turn resending its history with the runtime's own answers as the assistant's turns: (messages, output)
    per turn."""
    histories, turns = {name: [] for name in images}, []
    for name in order:
        history = histories[name]
        messages = history + [user_turn(QUESTIONS[len(history) // 2], n_images=int(not history), n_videos=0)]
        out = runtime.chat(messages, [images[name]], max_new_tokens=NEW_TOKENS, **settings)
        turns.append((messages, out))
        histories[name] = messages + [assistant(out.text)]
    return turns


@pytest.fixture(scope="module")
def chat(small_prefill):
    """A three-turn chat about IMAGE on a fresh runtime, with logits."""
    return converse(Runtime.load(small_prefill), "AAA", {"A": IMAGE}, keep_logits=True)


def test_a_chat_reuses_its_history_and_answers_as_transformers(chat, model_dir):
    row, previous = np.zeros(0, np.int64), 0  # the fresh runtime's cache holds nothing before turn 1
    for n, (messages, out) in enumerate(chat, start=1):
        inputs = hf_chat_inputs(model_dir, messages, [IMAGE])
        keys = tagged(model_dir, inputs["input_ids"][0], image=0)
        assert_answers_as_transformers(model_dir, inputs, out)
        # Every turn takes the same cache bucket, so what the last turn left there can serve this one.
        assert out.buckets["decode"] == "decode_b1_c256"
        assert out.prompt_tokens == len(keys)
        assert out.prompt_tokens_reused == reusable(keys, row), f"turn {n}"
        assert out.prompt_tokens_prefilled == len(keys) - out.prompt_tokens_reused
        assert out.prefill_chunks == len(chunks(len(keys), out.prompt_tokens_reused)), f"turn {n}"
        if n == 1:
            assert out.prompt_tokens_reused == 0 and out.prefill_chunks > 1
            assert out.buckets["vision"] == ["vision_224x224"]
        else:
            # Reused: the image, which is then not encoded at all, the last prompt, and the start of the last answer
            # (the image's seed is chosen so that it re-encodes), which the cache took in decode steps.
            assert out.buckets["vision"] == [] and out.vision_cache_hits == 0
            assert out.prompt_tokens_reused > previous
        row, previous = held(keys, out), len(keys)


def test_a_row_holds_what_it_was_fed_and_not_the_token_generated_last(small_prefill, model_dir):
    # A one-token answer: no decode step fed that token, so the cache holds the prompt alone. The next turn, whose
    # history does have the token right after the prompt, must reuse the prompt exactly and compute the token itself.
    question = user_turn(QUESTIONS[0], n_images=1, n_videos=0)
    runtime = Runtime.load(small_prefill)
    first = runtime.chat([question], [IMAGE], max_new_tokens=1)
    messages = [question, assistant(first.text), user_turn(QUESTIONS[1], n_images=0, n_videos=0)]
    out = runtime.chat(messages, [IMAGE], max_new_tokens=NEW_TOKENS, keep_logits=True)
    inputs = hf_chat_inputs(model_dir, messages, [IMAGE])
    keys = tagged(model_dir, inputs["input_ids"][0], image=0)
    assert keys[first.prompt_tokens] == first.token_ids[0]  # the answer's text encodes back to the same token
    assert out.prompt_tokens_reused == first.prompt_tokens
    assert_answers_as_transformers(model_dir, inputs, out)


# One user turn each, of 2-5 chunks of 64 tokens: text alone, with an image, with a video.
LONG = {
    "text": dict(text=STORY[:280]),
    "image": dict(text=STORY[:150], images=[sample_image(224, 224, seed=22)]),
    "video": dict(text=STORY[:100], videos=[video_frames(4, 112, 112, seed=23)]),
}


@pytest.mark.parametrize("kind", LONG)
def test_a_long_prompt_is_prefilled_in_chunks_and_answers_as_transformers(small_prefill, model_dir, kind):
    request = LONG[kind]
    inputs = hf_inputs(model_dir, **request)
    out = Runtime.load(small_prefill).generate(request["text"], images=request.get("images", ()),
                                               videos=request.get("videos", ()), max_new_tokens=NEW_TOKENS,
                                               keep_logits=True)
    assert_answers_as_transformers(model_dir, inputs, out)
    plan = choose_text_buckets(inputs["input_ids"].shape[1], NEW_TOKENS, SPEC)
    assert 2 <= len(plan.calls) <= 5 and out.prompt_tokens == inputs["input_ids"].shape[1]
    assert out.prefill_chunks == len(plan.calls)
    assert out.buckets["prefill"] == f"prefill_b1_s{plan.prefill}_c{plan.cache}"
    assert out.prompt_tokens_reused == 0 and out.prompt_tokens_prefilled == out.prompt_tokens


def test_a_prompt_that_ends_on_a_chunk_boundary_answers_as_transformers(small_prefill, model_dir):
    # The story cut where the prompt is exactly two chunks: the last call writes its last slot, with no padding.
    text = next(STORY[:n] for n in range(len(STORY))
                if hf_inputs(model_dir, STORY[:n])["input_ids"].shape[1] == 2 * CHUNK)
    out = Runtime.load(small_prefill).generate(text, max_new_tokens=NEW_TOKENS, keep_logits=True)
    assert_answers_as_transformers(model_dir, hf_inputs(model_dir, text), out)
    assert out.prompt_tokens == 2 * CHUNK and out.prefill_chunks == 2
    assert out.buckets["prefill"] == f"prefill_b1_s{CHUNK}_c256" and out.buckets["prefill_padding_tokens"] == 0


def test_a_turn_is_served_from_the_larger_cache_that_holds_its_history(small_prefill, model_dir):
    runtime = Runtime.load(small_prefill)
    first = [user_turn(STORY[:100], n_images=0, n_videos=0)]
    # Room for 200 new tokens puts the first turn in the 512-slot cache. The client keeps only the start of the
    # answer in its history, so the next turn, asking for few tokens, would take the 256-slot cache alone; but the
    # 512-slot one holds that history (the first prompt, and the answer up to where the client cut it).
    long = runtime.chat(first, max_new_tokens=200)
    messages = [*first, {"role": "assistant", "content": long.text[:5]}, {"role": "user", "content": "Go on."}]
    out = runtime.chat(messages, max_new_tokens=NEW_TOKENS, keep_logits=True)
    keys = hf_chat_inputs(model_dir, messages)["input_ids"][0]
    assert choose_text_buckets(len(keys), NEW_TOKENS, SPEC).cache == 256
    assert long.buckets["decode"] == out.buckets["decode"] == "decode_b1_c512"
    row = held(hf_chat_inputs(model_dir, first)["input_ids"][0], long)
    assert out.prompt_tokens_reused == reusable(keys, row) > CHUNK
    cold = Runtime.load(small_prefill, prefix_cache_mb=0).chat(messages, max_new_tokens=NEW_TOKENS, keep_logits=True)
    assert out.token_ids == cold.token_ids
    assert_logits_close(out.logits, cold.logits)


def test_a_new_conversation_takes_a_set_of_its_own_while_the_ceiling_allows(small_prefill, model_dir):
    # Two requests that share a long start but are not one conversation: the second does not overwrite the first's
    # history for the sake of their common start while there is room for another cache set.
    runtime = Runtime.load(small_prefill)
    runtime.generate(STORY[:280], max_new_tokens=NEW_TOKENS)
    assert runtime.generate(STORY[:100], max_new_tokens=NEW_TOKENS).prompt_tokens_reused == 0
    assert runtime.generate(STORY[:280], max_new_tokens=NEW_TOKENS).prompt_tokens_reused > CHUNK


def test_an_edited_turn_reuses_the_history_up_to_the_edit_only(chat, small_prefill, model_dir):
    messages, _ = chat[-1]
    # The second question changed in its middle: the history diverges there, after the image and the first turn.
    edited = copy.deepcopy(messages)
    edited[2]["content"][-1]["text"] = QUESTIONS[1].replace("colour", "shape")
    runtime = Runtime.load(small_prefill)
    before = runtime.chat(messages, [IMAGE], max_new_tokens=NEW_TOKENS)
    # The same conversation again (a retry): all of it is held but its last token, whose logits the prefill gives.
    again = runtime.chat(messages, [IMAGE], max_new_tokens=NEW_TOKENS)
    assert again.prompt_tokens_reused == again.prompt_tokens - 1 and again.token_ids == before.token_ids
    out = runtime.chat(edited, [IMAGE], max_new_tokens=NEW_TOKENS, keep_logits=True)
    row = held(tagged(model_dir, hf_chat_inputs(model_dir, messages, [IMAGE])["input_ids"][0], image=0), again)
    keys = tagged(model_dir, hf_chat_inputs(model_dir, edited, [IMAGE])["input_ids"][0], image=0)
    assert out.prompt_tokens_reused == reusable(keys, row)
    # Midway: past the image, and more than a chunk before the end, so the rest is chunked after the reused part.
    assert np.flatnonzero(keys < 0)[-1] < out.prompt_tokens_reused < len(keys) - CHUNK
    assert out.prefill_chunks == len(chunks(len(keys), out.prompt_tokens_reused)) > 1
    cold = Runtime.load(small_prefill, prefix_cache_mb=0).chat(edited, [IMAGE], max_new_tokens=NEW_TOKENS,
                                                                keep_logits=True)
    assert out.token_ids == cold.token_ids
    assert_logits_close(out.logits, cold.logits)


# Two conversations whose images have the same size, so their token ids are the same: only the images' content
# tells their prefixes apart.
TWO = {"A": sample_image(224, 224, seed=31), "B": sample_image(224, 224, seed=32)}


def test_one_cache_set_keeps_only_the_conversation_it_served_last(small_prefill, model_dir):
    caches = Runtime.load(small_prefill).artifacts.manifest.find("decode", batch=1, seq=1, cache=256).caches
    one_set_mb = sum(math.prod(c.shape) * np.dtype(c.dtype).itemsize for c in caches) / 2**20
    order = "ABAAB"
    turns = converse(Runtime.load(small_prefill, prefix_cache_mb=1.5 * one_set_mb), order, TWO)  # one set, not two
    cold = Runtime.load(small_prefill, prefix_cache_mb=0)
    row, reused = np.zeros(0, np.int64), []
    for name, (messages, out) in zip(order, turns, strict=True):
        assert out.token_ids == cold.chat(messages, [TWO[name]], max_new_tokens=NEW_TOKENS).token_ids
        keys = tagged(model_dir, hf_chat_inputs(model_dir, messages, [TWO[name]])["input_ids"][0], "AB".index(name))
        assert out.buckets["decode"] == "decode_b1_c256"
        assert out.prompt_tokens_reused == reusable(keys, row), name
        reused.append(out.prompt_tokens_reused)
        row = held(keys, out)
    # After the other conversation, only what both start with (the system prompt) was reused; right after its own
    # previous turn, a conversation reused its history, image included. (Every prompt here starts the same way up to
    # its image.)
    first_pad = np.flatnonzero(keys < 0)[0]
    assert reused[0] == 0 and max(reused[1], reused[2], reused[4]) <= first_pad < reused[3]


# Each conversation's history in a cache set of its own: the other's turn overwrites nothing it kept.
def test_two_conversations_keep_their_own_history_while_the_ceiling_allows(small_prefill, model_dir):
    (_, a1), _, (a2_messages, a2) = converse(Runtime.load(small_prefill), "ABA", TWO)  # 1024 MB: room for both
    a1_keys, a2_keys = (tagged(model_dir, hf_chat_inputs(model_dir, m, [TWO["A"]])["input_ids"][0], 0)
                        for m in (a2_messages[:1], a2_messages))
    assert a2.prompt_tokens_reused == reusable(a2_keys, held(a1_keys, a1))


def test_ceiling_zero_never_reuses_and_repeats_its_answers_exactly(chat, small_prefill):
    runtime = Runtime.load(small_prefill, prefix_cache_mb=0)
    # Each turn twice, the second time after the others have left the cache full of what they wrote.
    first, again = ([runtime.chat(messages, [IMAGE], max_new_tokens=NEW_TOKENS, keep_logits=True)
                     for messages, _ in chat] for _ in range(2))
    for (_, warm), out, repeated in zip(chat, first, again, strict=True):
        for o in out, repeated:
            assert o.prompt_tokens_reused == 0 and o.prompt_tokens_prefilled == o.prompt_tokens
            assert o.prefill_chunks == len(chunks(o.prompt_tokens))
        assert repeated.token_ids == out.token_ids
        assert all(np.array_equal(a, b) for a, b in zip(repeated.logits, out.logits, strict=True))
        # Reuse changed no answer: the chat that reused its history, computed in other calls.
        assert out.token_ids == warm.token_ids
        assert_logits_close(warm.logits, out.logits)


@pytest.mark.parametrize("vision_cache_mb, hits", [(256, [0, 1, 0]), (0, [0, 0, 0])])
def test_an_image_sent_again_is_taken_from_the_vision_cache(small_prefill, vision_cache_mb, hits):
    photo, other = sample_image(224, 224, seed=41), sample_image(224, 224, seed=42)
    # Text before the image in the later requests: the image is outside any prefix the cache holds, so it is needed.
    after_text = [{"role": "user", "content": [{"type": "text", "text": "Here is a photo."}, {"type": "image"},
                                               {"type": "text", "text": "What is in it?"}]}]
    requests = [([user_turn("Describe this image.", n_images=1, n_videos=0)], [photo]),
                (after_text, [photo]),  # the same image again
                (after_text, [other])]  # another image of the same size
    cold = Runtime.load(small_prefill, prefix_cache_mb=0, vision_cache_mb=0)
    runtime = Runtime.load(small_prefill, vision_cache_mb=vision_cache_mb)
    for (messages, images), hit in zip(requests, hits, strict=True):
        out = runtime.chat(messages, images, max_new_tokens=NEW_TOKENS)
        assert out.buckets["vision"] == ["vision_224x224"] and out.vision_cache_hits == hit
        assert out.token_ids == cold.chat(messages, images, max_new_tokens=NEW_TOKENS).token_ids


def test_generate_json_reports_reuse_chunks_and_vision_cache_hits(small_prefill, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    sample_image(224, 224, seed=51).save(photo)
    argv = ["generate", str(small_prefill), "-p", STORY[:200], "--image", str(photo), "--max-new-tokens",
            str(NEW_TOKENS), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    out = Runtime.load(small_prefill).generate(STORY[:200], images=[photo], max_new_tokens=NEW_TOKENS)
    # The fields of before, as they were; then the new ones.
    assert printed.keys() == {"text", "token_ids", "prompt_tokens", "buckets", "timings_ms", "prompt_tokens_reused",
                              "prompt_tokens_prefilled", "prefill_chunks", "vision_cache_hits"}
    assert [printed[k] for k in ("text", "token_ids", "prompt_tokens", "buckets")] == [
        out.text, out.token_ids, out.prompt_tokens, out.buckets]
    assert printed["timings_ms"].keys() == {"vision", "prefill", "decode_per_token", "total"}
    assert printed["prompt_tokens_reused"] == 0 and printed["prompt_tokens_prefilled"] == out.prompt_tokens
    assert printed["prefill_chunks"] == len(chunks(out.prompt_tokens)) > 1 and printed["vision_cache_hits"] == 0
