"""The random checkpoint writer: deterministic, hub layout that transformers loads as is, decisive greedy decoding."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from reference import hf_greedy, hf_inputs
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

from mindvl.errors import CheckpointError
from mindvl.testing.checkpoints import SPECIAL_TOKENS, write_checkpoint

TINY = ("tiny", "tiny-gqa3")


def load(model_dir, dtype=torch.float32):
    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)


def weights(model_dir) -> dict[str, np.ndarray]:
    return {k: v for path in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(path).items()}


def tensor(model_dir, name: str) -> np.ndarray | None:
    """One stored tensor without reading the rest (the 2B's file is 1.6 GB)."""
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="np") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return None


@pytest.fixture(scope="module", params=TINY)
def tiny_dir(request, checkpoint):
    return checkpoint(request.param)


def test_same_seed_same_bytes_and_reuse(tmp_path):
    a = write_checkpoint(tmp_path / "a", "tiny", seed=3)
    b = tmp_path / "b"  # written by another process: no per-process hash seeds may leak into the bytes
    script = f"from mindvl.testing.checkpoints import write_checkpoint; write_checkpoint({str(b)!r}, 'tiny', seed=3)"
    subprocess.run([sys.executable, "-c", script], check=True)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert write_checkpoint(a, "tiny", seed=3) == a  # complete: reused, not rewritten
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(CheckpointError, match="is not this fixture"):
        write_checkpoint(a, "tiny", seed=4)

    c = write_checkpoint(tmp_path / "c", "tiny", seed=4)
    assert (c / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert not np.array_equal(weights(c)["lm_head.weight"], weights(a)["lm_head.weight"])


def test_sharded_equals_single_after_load(tmp_path):
    single = write_checkpoint(tmp_path / "single", "tiny-gqa3")
    sharded = write_checkpoint(tmp_path / "sharded", "tiny-gqa3", shard_max_bytes=64 * 1024)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights(single).values())

    (m1, info1), (m2, info2) = load(single), load(sharded)
    assert info1["missing_keys"] == info2["missing_keys"] == []
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", {}), ("tiny-gqa3", {}), ("2b-shapes", dict(num_hidden_layers=2, vision_depth=2)),
])  # fmt: skip
def test_transformers_loads_every_tensor(tmp_path, preset, overrides):
    model_dir = write_checkpoint(tmp_path / preset, preset, **overrides)
    model, info = load(model_dir)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert config["rope_scaling"]["type"] == "mrope" and "text_config" not in config  # the flat hub layout
    assert (tensor(model_dir, "lm_head.weight") is None) == config["tie_word_embeddings"]
    norm = torch.from_numpy(tensor(model_dir, "model.norm.weight"))
    assert torch.equal(model.model.language_model.norm.weight, norm)  # loaded, not re-initialised

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    first = 151643 if preset == "2b-shapes" else config["vocab_size"] - len(SPECIAL_TOKENS)
    assert special == list(range(first, first + len(SPECIAL_TOKENS)))
    names = dict(
        bos="<|endoftext|>",
        eos="<|im_end|>",
        vision_start="<|vision_start|>",
        vision_end="<|vision_end|>",
        vision="<|vision_pad|>",
        image="<|image_pad|>",
        video="<|video_pad|>",
    )
    config_ids = {k: config[f"{k}_token_id"] for k in names}
    assert config_ids == {k: tokenizer.convert_tokens_to_ids(t) for k, t in names.items()}
    assert len(tokenizer) == (151657 if preset == "2b-shapes" else config["vocab_size"])


def prompts():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8))
    frames = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    return {
        "text": dict(text="Write a short poem about the sea."),
        "image": dict(text="Describe this image.", images=[picture]),
        "video": dict(text="What happens in this video?", videos=[frames]),
    }


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_greedy_decoding_has_clear_margins(tiny_dir, kind):
    new_ids, margin = hf_greedy(tiny_dir, hf_inputs(tiny_dir, **prompts()[kind]), max_new_tokens=16)
    assert margin > 1e-2
    assert new_ids.shape[1] > 1 and len(set(new_ids[0].tolist())) > 1, "decoding should depend on context"


def test_float16_stays_finite(tiny_dir):
    inputs = hf_inputs(tiny_dir, "Both?", images=prompts()["image"]["images"], videos=prompts()["video"]["videos"])
    model, _ = load(tiny_dir, torch.float16)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.inference_mode():
        logits = model(**tensors).logits
    assert torch.isfinite(logits).all()
