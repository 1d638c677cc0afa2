"""Random Qwen2-VL checkpoints in the hub layout, written without torch, for tests and the demo.

`write_checkpoint` produces a folder that `transformers` loads exactly as it loads Qwen/Qwen2-VL-2B-Instruct:
the flat config.json (text keys at top level, `vision_config` nested, `rope_scaling.mrope_section`),
safetensors under the hub's tensor names, a byte-level BPE tokenizer carrying Qwen2-VL's 14 special tokens,
the chat template, and the image processor config. Only the sizes and the weights are made up.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mindvl.errors import CheckpointError
from mindvl.testing.architectures import FIXTURES, hub_config

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# Qwen2-VL-2B-Instruct's template, verbatim (it lives in both tokenizer_config.json and chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2 / Qwen2-VL checkpoint).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Where the 2B's special tokens sit; tiny presets put them at the top of their vocabulary instead.
_QWEN2_REGULAR_VOCAB = 151643

# Init scales, chosen so that greedy decoding has clear winners and depends on the context. Measured with
# transformers, 16 greedy steps on 24 text/image/video prompts (384 steps per preset): seed 0's smallest top-2
# margin is 0.07 logits for tiny and 0.42 for tiny-gqa3 (medians 12 and 32); seeds 1-3 had 0.02-0.18. Gaps are
# those of the max of a few hundred Gaussians, so one step in ~1000 can still fall below 1e-2 on other seeds or
# prompts. With every gain 1 and a final norm of 1, tiny-gqa3's tied head repeated the last prompt token for all
# 16 steps and tiny's margins fell to 0.08 on 6 prompts.
# - Pre-norm blocks see unit-RMS inputs, so projections are N(0, gain^2 / fan_in).
# - q/k (and the whole vision qkv) have gain 2: scores of std ~4 give sharp, position-dependent attention, so the
#   prompt, the images and M-RoPE change the output instead of being averaged away by near-uniform attention.
# - Residual writers (o_proj, down_proj, attn.proj, fc2) have gain 3, and embeddings are N(0, 1): the blocks'
#   updates outweigh the token's own embedding, otherwise a tied LM head just predicts the current token again.
# - The LM head (tied or not) is N(0, 1) and the final norm weight is ~6: logits spread with std ~6*sqrt(hidden)
#   (48 and 60 for the tiny presets), so the median top-2 gap is 10 logits or more. This makes
#   sampling at temperature 1 nearly greedy; use a temperature of ~20 to see a spread.
# - Everything stays O(1..300), finite in float16 (fp16 logits are within ~3 of fp32 there, same argmax).
# - Other norm weights are 1 +- 0.1 and biases N(0, 0.05^2): a dropped or transposed one shows in parity tests.
_EMBED_STD = 1.0
_LM_HEAD_STD = 1.0
_NORM_NOISE = 0.1
_BIAS_STD = 0.05
_QK_GAIN = 2.0
_OUT_GAIN = 3.0
_FINAL_NORM = 6.0


def write_checkpoint(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    *,
    seed: int = 0,
    num_hidden_layers: int | None = None,
    vision_depth: int | None = None,
    shard_max_bytes: int | None = None,
) -> Path:
    """Write a random Qwen2-VL model folder (or reuse it if it is already there) and return its path.

    Byte-identical for the same arguments. Written into a temporary sibling folder and renamed into place,
    so `out_dir` is either absent, empty, or a complete checkpoint.
    """
    if preset not in FIXTURES:
        raise ValueError(f"unknown fixture preset {preset!r}; choose one of {sorted(FIXTURES)}")
    out = Path(out_dir)
    config = _config(preset, num_hidden_layers, vision_depth)
    specs = _weight_specs(config)
    shards = _plan_shards(specs, shard_max_bytes)
    texts = _text_files(config)
    if shard_max_bytes is not None:
        texts["model.safetensors.index.json"] = _index(specs, shards)
    if out.exists() and any(out.iterdir()):
        if _is_complete(out, texts, specs, shards, seed):
            return out
        raise CheckpointError(
            f"{out} exists and is not this fixture ({preset}, seed {seed}): delete it or pick another folder"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for file, names in shards.items():
            tensors = {name: _init(name, specs[name], seed) for name in names}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is meant to be shared
        os.replace(tmp, out)  # an empty out_dir is replaced atomically
    except OSError:
        if not _is_complete(out, texts, specs, shards, seed):  # else another process won the race: reuse
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename
    return out


def write_model_files(out_dir: str | os.PathLike, preset: str, **preprocessor: int) -> Path:
    """A checkpoint's config, tokenizer and preprocessor files without its weights: all that `mindvl plan` reads,
    for a model too large to write at random. `preprocessor` overrides preprocessor_config.json keys."""
    if preset not in FIXTURES:
        raise ValueError(f"unknown fixture preset {preset!r}; choose one of {sorted(FIXTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in _text_files(_config(preset, None, None)).items():
        if name == "preprocessor_config.json":
            text = _json({**json.loads(text), **preprocessor})
        (out / name).write_text(text, encoding="utf-8")
    return out


def _config(preset: str, num_hidden_layers: int | None, vision_depth: int | None) -> dict:
    arch = json.loads(json.dumps(FIXTURES[preset]))  # deep copy
    if num_hidden_layers is not None:
        arch["num_hidden_layers"] = num_hidden_layers
    if vision_depth is not None:
        arch.setdefault("vision_config", {})["depth"] = vision_depth
    config = hub_config(arch)
    ids = _special_ids(config["vocab_size"])
    return {
        **config,
        "max_window_layers": config["num_hidden_layers"],
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def _special_ids(vocab_size: int) -> dict[str, int]:
    first = _QWEN2_REGULAR_VOCAB if vocab_size > _QWEN2_REGULAR_VOCAB else vocab_size - len(SPECIAL_TOKENS)
    return {token: first + i for i, token in enumerate(SPECIAL_TOKENS)}


# ---- text files ---------------------------------------------------------------------------------------------


def _text_files(config: dict) -> dict[str, str]:
    ids = _special_ids(config["vocab_size"])
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    generation = {
        "bos_token_id": pad, "pad_token_id": pad, "eos_token_id": [eos, pad], "do_sample": True,
        "repetition_penalty": 1.0, "temperature": 0.01, "top_p": 0.001, "top_k": 1,
        "transformers_version": "4.37.0",
    }  # fmt: skip
    preprocessor = {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }  # fmt: skip
    return {
        "config.json": _json(config),
        "generation_config.json": _json(generation),
        "preprocessor_config.json": _json(preprocessor),
        "tokenizer.json": _tokenizer(ids).to_str(pretty=True),
        "tokenizer_config.json": _json(_tokenizer_config(ids)),
        "chat_template.json": _json({"chat_template": CHAT_TEMPLATE}),
    }


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _tokenizer_config(ids: dict[str, int]) -> dict:
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": t, **flags} for t, i in ids.items()}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tokenizer(ids: dict[str, int]) -> Tokenizer:
    """Byte-level BPE like Qwen2's: 256 byte tokens, then merges until the special tokens' first id.

    Merges pair frequent English characters first, so short prompts use a mix of merged and byte tokens, then
    continue over all byte pairs and triples (the 2B vocabulary needs 151387 of them). Every tokenizer id
    decodes; the 2B's config vocab_size (151936) runs past the tokenizer's 151657 ids, as on the hub.
    """
    byte_chars = _byte_chars()
    frequent_first = b" etaoinsrhldcumfpgwybvkxjqz\nETAOINSRHLDCUMFPGWYBVKXJQZ.,0123456789" + bytes(range(256))
    order = list(dict.fromkeys(frequent_first))
    chars = [byte_chars[b] for b in order]
    vocab = {c: i for i, c in enumerate(byte_chars)}
    n_merges = min(ids.values()) - 256
    pairs = sorted(((i, j) for i in range(256) for j in range(256)), key=lambda p: (max(p), p))
    byte_pairs = [(chars[i], chars[j]) for i, j in pairs]
    triples = ((a + b, c) for a, b in byte_pairs for c in chars)
    merges = list(itertools.islice(itertools.chain(byte_pairs, triples), n_merges))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


# ---- weights ------------------------------------------------------------------------------------------------

# (shape, mean, std) per tensor name.
Spec = tuple[tuple[int, ...], float, float]


def _weight_specs(config: dict) -> dict[str, Spec]:
    v = config["vision_config"]
    e, hidden, inter = v["embed_dim"], config["hidden_size"], config["intermediate_size"]
    merged = e * v["spatial_merge_size"] ** 2
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    patch = v["in_chans"] * v["temporal_patch_size"] * v["patch_size"] ** 2

    def linear(name: str, out_f: int, in_f: int, bias: bool = True, gain: float = 1.0) -> dict[str, Spec]:
        specs = {f"{name}.weight": ((out_f, in_f), 0.0, gain * in_f**-0.5)}
        return specs | ({f"{name}.bias": ((out_f,), 0.0, _BIAS_STD)} if bias else {})

    def norm(name: str, dim: int, bias: bool, mean: float = 1.0) -> dict[str, Spec]:
        specs = {f"{name}.weight": ((dim,), mean, _NORM_NOISE)}
        return specs | ({f"{name}.bias": ((dim,), 0.0, _BIAS_STD)} if bias else {})

    patch_shape = (e, v["in_chans"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    s: dict[str, Spec] = {"visual.patch_embed.proj.weight": (patch_shape, 0.0, patch**-0.5)}
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}"
        s |= norm(f"{b}.norm1", e, bias=True) | norm(f"{b}.norm2", e, bias=True)
        s |= linear(f"{b}.attn.qkv", 3 * e, e, gain=_QK_GAIN) | linear(f"{b}.attn.proj", e, e, gain=_OUT_GAIN)
        s |= linear(f"{b}.mlp.fc1", e * v["mlp_ratio"], e)
        s |= linear(f"{b}.mlp.fc2", e, e * v["mlp_ratio"], gain=_OUT_GAIN)
    s |= norm("visual.merger.ln_q", e, bias=True)
    s |= linear("visual.merger.mlp.0", merged, merged) | linear("visual.merger.mlp.2", v["hidden_size"], merged)

    s["model.embed_tokens.weight"] = ((config["vocab_size"], hidden), 0.0, _EMBED_STD)
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}"
        s |= norm(f"{b}.input_layernorm", hidden, bias=False)
        s |= norm(f"{b}.post_attention_layernorm", hidden, bias=False)
        s |= linear(f"{b}.self_attn.q_proj", hidden, hidden, gain=_QK_GAIN)
        s |= linear(f"{b}.self_attn.k_proj", kv, hidden, gain=_QK_GAIN)
        s |= linear(f"{b}.self_attn.v_proj", kv, hidden)
        s |= linear(f"{b}.self_attn.o_proj", hidden, hidden, bias=False, gain=_OUT_GAIN)
        s |= linear(f"{b}.mlp.gate_proj", inter, hidden, bias=False)
        s |= linear(f"{b}.mlp.up_proj", inter, hidden, bias=False)
        s |= linear(f"{b}.mlp.down_proj", hidden, inter, bias=False, gain=_OUT_GAIN)
    s |= norm("model.norm", hidden, bias=False, mean=_FINAL_NORM)
    if not config["tie_word_embeddings"]:
        s["lm_head.weight"] = ((config["vocab_size"], hidden), 0.0, _LM_HEAD_STD)
    return dict(sorted(s.items()))


def _init(name: str, spec: Spec, seed: int) -> np.ndarray:
    """One tensor from its own seed stream: the value depends on (seed, name) only, not on layer count or order."""
    shape, mean, std = spec
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    if mean:
        values += np.float32(mean)
    return values


def _plan_shards(specs: dict[str, Spec], shard_max_bytes: int | None) -> dict[str, list[str]]:
    """File name -> tensor names; greedy in name order, a tensor larger than the limit gets a file of its own."""
    if shard_max_bytes is None:
        return {"model.safetensors": list(specs)}
    groups: list[list[str]] = [[]]
    size = 0
    for name, (shape, _, _) in specs.items():
        nbytes = 4 * int(np.prod(shape))
        if groups[-1] and size + nbytes > shard_max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    return {f"model-{k + 1:05d}-of-{n:05d}.safetensors": names for k, names in enumerate(groups)}


def _index(specs: dict[str, Spec], shards: dict[str, list[str]]) -> str:
    total = sum(4 * int(np.prod(shape)) for shape, _, _ in specs.values())
    weight_map = {name: file for file, names in shards.items() for name in names}
    return _json({"metadata": {"total_size": total}, "weight_map": weight_map})


def _is_complete(
    folder: Path, texts: dict[str, str], specs: dict[str, Spec], shards: dict[str, list[str]], seed: int
) -> bool:
    """Same text files, the same weight files, and a small probe tensor that matches this seed."""
    probe = "model.norm.weight"
    try:
        if any((folder / name).read_text(encoding="utf-8") != text for name, text in texts.items()):
            return False
        if not all((folder / file).is_file() for file in shards):
            return False
        file = next(file for file, names in shards.items() if probe in names)
        with safe_open(folder / file, framework="np") as f:
            stored = f.get_tensor(probe)
    except (OSError, ValueError, RuntimeError):
        return False
    return bool(np.array_equal(stored, _init(probe, specs[probe], seed)))
