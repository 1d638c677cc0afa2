"""Host-side sampling rules and streaming detokenisation."""

import numpy as np
import pytest

from mindvl.errors import RequestError
from mindvl.runtime.detokenize import StreamDecoder
from mindvl.runtime.sampling import Sampling, next_token

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


def frequencies(sampling, n=20000):
    rng = np.random.default_rng(0)
    counts = np.bincount([next_token(LOGITS, sampling, rng) for _ in range(n)], minlength=4)
    return counts / n


def test_greedy_is_argmax():
    assert next_token(LOGITS, Sampling(), np.random.default_rng(0)) == 0


def test_temperature_one_follows_the_distribution():
    np.testing.assert_allclose(frequencies(Sampling(temperature=1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_top_k_and_top_p_cut_the_tail():
    np.testing.assert_allclose(frequencies(Sampling(temperature=1.0, top_k=2)), [0.625, 0.375, 0, 0], atol=0.015)
    # 0.5 + 0.3 reaches top_p 0.8: the two most likely tokens are kept, renormalised.
    np.testing.assert_allclose(frequencies(Sampling(temperature=1.0, top_p=0.8)), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(frequencies(Sampling(temperature=1.0, top_p=0.81)), [0.5263, 0.3158, 0.1579, 0],
                               atol=0.015)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30])
def test_a_tiny_temperature_samples_the_most_likely_token_without_overflow(temperature):
    logits = np.array([1.0, 3.0, 2.9, -5.0], np.float32)
    with np.errstate(over="raise", invalid="raise"):  # an overflow or a NaN would raise, not warn
        picks = {next_token(logits, Sampling(temperature=temperature), np.random.default_rng(s)) for s in range(20)}
    assert picks == {1}


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5])
def test_invalid_seeds(seed):
    with pytest.raises(RequestError, match=f"seed={seed} is invalid: use an integer from 0 to"):
        Sampling(seed=seed)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_invalid_settings(bad):
    with pytest.raises(RequestError, match="invalid"):
        Sampling(**bad)


def test_stream_decoder_waits_for_whole_characters():
    # "é" is two bytes: a byte-level tokenizer can emit them as two tokens.
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!"}
    decoder = StreamDecoder(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace"))
    assert [decoder.push(i) for i in (1, 2, 3, 4)] == ["caf", "", "é", "!"]
    assert decoder.flush() == "" and decoder.emitted == "café!"
