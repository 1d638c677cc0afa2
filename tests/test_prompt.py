"""Our chat template + pad expansion + tokenization give exactly transformers' processor input_ids."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image
from reference import hf_inputs
from transformers import AutoTokenizer

from mindvl.errors import CheckpointError, MediaError
from mindvl.shapes.prompt import Tokenizer, build_prompt, expand_vision_pads
from mindvl.testing.checkpoints import SPECIAL_TOKENS

TEXT = "Héllo  wörld!\n\n  日本語 🙂 What's in 3 pictures?"


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def video(t: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


CASES = {
    "text": dict(),
    "image": dict(images=[image(56, 84, 1)]),
    "two_images": dict(images=[image(84, 112, 2), image(140, 56, 3)]),
    "video": dict(videos=[video(4, 56, 84, 4)]),
    "image_video": dict(images=[image(56, 56, 5)], videos=[video(3, 56, 56, 6)]),  # odd frames: padded to 4
}


@pytest.mark.parametrize("case", CASES)
def test_input_ids_match_transformers_processor(model_dir, tokenizer, case):
    media = CASES[case]
    expected = hf_inputs(model_dir, TEXT, **media)
    prompt = build_prompt(model_dir, TEXT, len(media.get("images", ())), len(media.get("videos", ())))
    prompt = expand_vision_pads(prompt, expected.get("image_grid_thw"), expected.get("video_grid_thw"), merge_size=2)
    np.testing.assert_array_equal(tokenizer.encode(prompt), expected["input_ids"][0])
    assert tokenizer.encode(prompt).dtype == np.int64


def test_prompt_matches_tokenizer_chat_template(model_dir):
    content = [{"type": "image"}, {"type": "image"}, {"type": "video"}, {"type": "text", "text": TEXT}]
    expected = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert build_prompt(model_dir, TEXT, n_images=2, n_videos=1) == expected
    assert expected.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_decode_round_trip_and_special_ids(model_dir, tokenizer):
    hf = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(build_prompt(model_dir, TEXT, 1, 0))
    assert tokenizer.decode(ids) == hf.decode(ids) == build_prompt(model_dir, TEXT, 1, 0)
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert tokenizer.special_ids == {t: hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert tokenizer.token_id("<|image_pad|>") == hf.convert_tokens_to_ids("<|image_pad|>")
    assert tokenizer.eos_token_ids == (tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>"))
    with pytest.raises(CheckpointError, match=re.escape("the tokenizer has no special token <|nope|>")):
        tokenizer.token_id("<|nope|>")


def test_expand_counts_each_grid_in_order():
    prompt = "a<|image_pad|>b<|video_pad|>c<|image_pad|>"
    out = expand_vision_pads(prompt, [[1, 4, 6], [1, 2, 2]], np.array([[2, 4, 4]]), merge_size=2)
    assert out == "a" + "<|image_pad|>" * 6 + "b" + "<|video_pad|>" * 8 + "c<|image_pad|>"
    with pytest.raises(MediaError, match="2 <\\|image_pad\\|> placeholders but 1 grids"):
        expand_vision_pads(prompt, [[1, 4, 6]], [[2, 4, 4]], merge_size=2)
    with pytest.raises(MediaError, match="0 <\\|video_pad\\|> placeholders but 1 grids"):
        expand_vision_pads("<|image_pad|>", [[1, 2, 2]], [[2, 2, 2]], merge_size=2)


@pytest.fixture
def text_files(model_dir, tmp_path):
    """The model folder's small files, to break one at a time."""
    for path in model_dir.iterdir():
        if path.suffix == ".json":
            shutil.copy(path, tmp_path)
    return tmp_path


def test_missing_or_corrupt_tokenizer_is_one_line_error(text_files):
    (text_files / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing") as missing:
        Tokenizer.from_dir(text_files)
    (text_files / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError, match="tokenizer.json is corrupt") as corrupt:
        Tokenizer.from_dir(text_files)
    assert "\n" not in str(missing.value) + str(corrupt.value)


def test_missing_chat_template_and_corrupt_config_are_errors(text_files):
    (text_files / "chat_template.json").unlink()
    config = (text_files / "tokenizer_config.json").read_text()
    (text_files / "tokenizer_config.json").write_text(config.replace('"chat_template"', '"no_template"'))
    with pytest.raises(CheckpointError, match="has no chat template"):
        build_prompt(text_files, "hi", 0, 0)
    (text_files / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json is corrupt"):
        Tokenizer.from_dir(text_files)
