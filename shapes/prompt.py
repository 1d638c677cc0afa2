"""The prompt as transformers' Qwen2VLProcessor builds it: chat template, vision pad expansion, tokenization.

Only jinja2 and `tokenizers`: the model folder's own template is rendered the way transformers renders it,
each `<|image_pad|>` / `<|video_pad|>` becomes one pad per merged visual token, and the result is encoded with
the folder's tokenizer.json.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from mindvl.errors import CheckpointError, MediaError

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
_PADS = re.compile(f"({re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)})")
# Passed to the template like transformers passes the tokenizer's special_tokens_map.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")


def user_turn(text: str, n_images: int, n_videos: int) -> dict:
    """One user message in the chat template's form: images, then videos, then the text."""
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def build_prompt(tokenizer_dir: str | os.PathLike, text: str, n_images: int, n_videos: int) -> str:
    """One user turn (images, then videos, then the text) through the folder's chat template, with the
    generation prompt: what `processor.apply_chat_template(..., add_generation_prompt=True)` returns."""
    return chat_prompt(tokenizer_dir, [user_turn(text, n_images, n_videos)])


class ChatTemplate:
    """A folder's chat template and the special tokens it is rendered with, read once."""

    def __init__(self, tokenizer_dir: str | os.PathLike) -> None:
        folder = Path(tokenizer_dir)
        config = _optional_json(folder / "tokenizer_config.json")
        self.special = {key: _token_text(config[key]) for key in _SPECIAL_TOKEN_KEYS if config.get(key)}
        self.template = _compile(_chat_template(folder, config))

    def render(self, messages: Sequence[dict]) -> str:
        """A whole conversation (role/content messages; content a string or a list of {"type": "text" | "image" |
        "video"} parts), with the generation prompt."""
        return self.template.render(messages=list(messages), tools=None, documents=None, add_generation_prompt=True,
                                    **self.special)


def chat_prompt(tokenizer_dir: str | os.PathLike, messages: Sequence[dict]) -> str:
    """A whole conversation through the folder's chat template (see `ChatTemplate.render`)."""
    return ChatTemplate(tokenizer_dir).render(messages)


def expand_vision_pads(
    prompt: str,
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
    video_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
    merge_size: int,
) -> str:
    """Repeat the k-th image (video) pad t*h*w / merge_size^2 times, for the k-th row of its grid."""
    grids = {IMAGE_PAD: _grid_rows(image_grid_thw), VIDEO_PAD: _grid_rows(video_grid_thw)}
    used = {IMAGE_PAD: 0, VIDEO_PAD: 0}
    pieces = []
    for piece in _PADS.split(prompt):
        if piece in grids:
            k = used[piece]
            used[piece] += 1
            if k < len(grids[piece]):
                t, h, w = grids[piece][k]
                piece *= t * h * w // merge_size**2
        pieces.append(piece)
    for pad, rows in grids.items():
        if used[pad] != len(rows):
            raise MediaError(
                f"the prompt has {used[pad]} {pad} placeholders but {len(rows)} grids were given: "
                f"pass one image (video) per placeholder and keep {pad} out of the text"
            )
    return "".join(pieces)


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """The folder's tokenizer.json, plus what generation needs: eos ids and the special tokens' ids."""

    backend: BackendTokenizer
    eos_token_ids: tuple[int, ...]
    special_ids: dict[str, int]

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        folder = Path(model_dir)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: copy tokenizer.json from the model's published folder")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"{path} is corrupt ({_first_line(e)}): download it again") from e
        special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        return cls(backend, _eos_token_ids(folder, backend), special)

    def encode(self, text: str) -> np.ndarray:
        """Token ids [S] as int64; special tokens written in the text (e.g. <|im_start|>) map to their ids."""
        return np.asarray(self.backend.encode(text).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of a special token by its text, e.g. token_id("<|image_pad|>")."""
        if token not in self.special_ids:
            raise CheckpointError(f"the tokenizer has no special token {token}: is this a Qwen2-VL checkpoint?")
        return self.special_ids[token]


def _chat_template(folder: Path, tokenizer_config: dict) -> str:
    """The processor's template (chat_template.jinja, then chat_template.json), else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _optional_json(folder / "chat_template.json").get("chat_template")
    template = template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise CheckpointError(
            f"{folder} has no chat template: add chat_template.json from the model's published folder"
        )
    return template


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # The environment transformers renders chat templates in, so whitespace handling is identical.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _eos_token_ids(folder: Path, backend: BackendTokenizer) -> tuple[int, ...]:
    """generation_config.json's eos ids (Qwen2-VL stops on <|im_end|> and <|endoftext|>), else config.json's,
    else the tokenizer's eos token."""
    for name in ("generation_config.json", "config.json"):
        eos = _optional_json(folder / name).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    eos_token = _optional_json(folder / "tokenizer_config.json").get("eos_token")
    eos = backend.token_to_id(_token_text(eos_token)) if eos_token else None
    if eos is None:
        raise CheckpointError(
            f"{folder} names no eos token: add generation_config.json from the model's published folder"
        )
    return (eos,)


def _grid_rows(grid: np.ndarray | Sequence[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [(int(t), int(h), int(w)) for t, h, w in np.asarray(grid, dtype=np.int64).reshape(-1, 3)]


def _token_text(token: str | dict | list) -> str | list:
    """tokenizer_config.json writes a special token as its text or as a serialized AddedToken."""
    if isinstance(token, list):
        return [_token_text(t) for t in token]
    return token["content"] if isinstance(token, dict) else token


def _optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt ({_first_line(e)}): download it again") from e


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
