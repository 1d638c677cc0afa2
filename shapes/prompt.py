"""The prompt as transformers' Qwen2VLProcessor builds it: chat template, vision pad expansion, tokenization.

Only jinja2 and `tokenizers`: the model folder's own template is rendered the way transformers renders it,
each `<|image_pad|>` / `<|video_pad|>` becomes one pad per merged visual token, and the result is encoded with
the folder's tokenizer.json. `encode_chat` does all three, with one difference: the messages' text is always
plain text, so special tokens typed in it never become control tokens.
"""

from __future__ import annotations

import functools
import json
import math
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
from tokenizers import Encoding
from tokenizers import Tokenizer as BackendTokenizer

from mindvl.errors import CheckpointError, MediaError, RequestError

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
_PADS = re.compile(f"({re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)})")
# Each message text stands in the rendered template as OPEN index CLOSE. Lone surrogates are refused in message
# text (they are not Unicode), so these marks cannot be typed by a client.
_MARK_OPEN, _MARK_CLOSE = "\ud800", "\udfff"
_MARK = re.compile(f"{_MARK_OPEN}([0-9]+){_MARK_CLOSE}")
_SURROGATE = re.compile("[\ud800-\udfff]")
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


def text_tokens(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[dict]) -> int:
    """A conversation's prompt tokens but its visual ones (which the buckets decide): the chat template's rendering
    holds one pad token per image and video, which the visual tokens replace. What `mindvl plan` plans text for."""
    pads = sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if part.get("type") in ("image", "video"))
    return len(tokenizer.encode(template.render(messages))) - pads


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
    pieces = _PADS.split(prompt)  # pads at odd indices
    repeats = iter(_pad_repeats(pieces[1::2], image_grid_thw, video_grid_thw, merge_size))
    return "".join(piece * next(repeats) if i % 2 else piece for i, piece in enumerate(pieces))


def encode_chat(
    template: ChatTemplate,
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
    video_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
    merge_size: int,
) -> np.ndarray:
    """int64 [S] token ids of the conversation with the generation prompt: what
    `tokenizer.encode(expand_vision_pads(template.render(messages), ...))` gives, except that the messages' text
    (every role's: string content and the "text" of content parts) is always plain text. Special tokens typed in
    it (<|im_end|>, <|image_pad|>, ...) are encoded as the characters they are made of, so only the template
    writes control tokens and only its own vision pads are expanded. Raises RequestError for text that is not
    valid Unicode, MediaError when the template's image (video) pads do not match the grids' rows."""
    marked, texts = _mark_texts(messages)
    for where, text in texts:
        _check_unicode(text, where if len(texts) > 1 else "")
    pieces = _render_apart(template, messages, marked, [text for _, text in texts])
    # The pre-tokenizer must see each stretch between control tokens whole, template and message text together
    # (e.g. "user\n" + the text), as it does when the whole prompt is encoded at once.
    stretches, controls = [""], []
    for piece, from_template in pieces:
        parts = tokenizer.control.split(piece) if from_template else [piece]
        stretches[-1] += parts[0]
        controls += parts[1::2]
        stretches += parts[2::2]
    pads = [token for token in controls if token in (IMAGE_PAD, VIDEO_PAD)]
    repeats = iter(_pad_repeats(pads, image_grid_thw, video_grid_thw, merge_size))
    encodings = [tokenizer.plain.encode(stretches[0], add_special_tokens=False)]
    for token, stretch in zip(controls, stretches[1:], strict=True):
        if token in (IMAGE_PAD, VIDEO_PAD):
            token *= next(repeats)
        encodings.append(tokenizer.backend.encode(token, add_special_tokens=False))
        encodings.append(tokenizer.plain.encode(stretch, add_special_tokens=False))
    # The post-processor adds what the tokenizer adds around a whole sequence (nothing for Qwen2-VL's).
    return np.asarray(tokenizer.backend.post_process(Encoding.merge(encodings)).ids, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """The folder's tokenizer.json, plus what generation needs: eos ids and the special tokens' ids."""

    backend: BackendTokenizer
    eos_token_ids: tuple[int, ...]
    special_ids: dict[str, int]
    # The same tokenizer reading special tokens' text as plain text: for the text no template wrote. A second
    # instance, because toggling the backend's flag would race with other threads encoding.
    plain: BackendTokenizer
    control: re.Pattern  # any special token (the longest where several match), in a group: for re.split

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        folder = Path(model_dir)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: copy tokenizer.json from the model's published folder")
        try:
            backend, plain = BackendTokenizer.from_file(str(path)), BackendTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"{path} is corrupt ({_first_line(e)}): download it again") from e
        plain.encode_special_tokens = True
        special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        longest_first = sorted(special, key=len, reverse=True)
        control = re.compile("(" + ("|".join(map(re.escape, longest_first)) or "(?!)") + ")")
        return cls(backend, _eos_token_ids(folder, backend), special, plain, control)

    def encode(self, text: str) -> np.ndarray:
        """Token ids [S] as int64; special tokens written in the text (e.g. <|im_start|>) map to their ids, so
        the text must not come from a user (a conversation goes through `encode_chat`)."""
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


def _pad_repeats(
    pads: Sequence[str],
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
    video_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
    merge_size: int,
) -> list[int]:
    """How often each of `pads` (a prompt's image and video pads, in order) is repeated: t*h*w / merge_size^2
    for the k-th image (video) pad and the k-th row of its grid."""
    grids = {IMAGE_PAD: _grid_rows(image_grid_thw), VIDEO_PAD: _grid_rows(video_grid_thw)}
    for pad, rows in grids.items():
        if pads.count(pad) != len(rows):
            kind = "image" if pad == IMAGE_PAD else "video"
            raise MediaError(
                f"the prompt has {pads.count(pad)} {pad} placeholders but {len(rows)} grids were given: "
                f'pass one {kind} per {{"type": "{kind}"}} part of the messages'
            )
    rows = {pad: iter(grid) for pad, grid in grids.items()}
    return [math.prod(next(rows[pad])) // merge_size**2 for pad in pads]


def _mark_texts(messages: Sequence[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The messages with each text (string content, "text" of a content part) replaced by its mark, and the
    texts in mark order, each with where it is ("messages[i].content[j].text")."""
    texts = []

    def mark(text: str, where: str) -> str:
        texts.append((where, text))
        return f"{_MARK_OPEN}{len(texts) - 1}{_MARK_CLOSE}"

    marked = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            message = {**message, "content": mark(content, f"messages[{i}].content")}
        elif isinstance(content, list):
            parts = [{**part, "text": mark(part["text"], f"messages[{i}].content[{j}].text")}
                     if isinstance(part, dict) and isinstance(part.get("text"), str) else part
                     for j, part in enumerate(content)]
            message = {**message, "content": parts}
        marked.append(message)
    return marked, texts


def _check_unicode(text: str, where: str) -> None:
    # tokenizers cannot take a lone surrogate (from invalid UTF-8 decoded with surrogateescape, or JSON "\ud800").
    bad = _SURROGATE.search(text)
    if bad:
        raise RequestError(
            f"{where + ': ' if where else ''}the prompt text is not valid Unicode (it contains a lone surrogate "
            f"at character {bad.start()}); send UTF-8 text"
        )


def _render_apart(
    template: ChatTemplate, messages: Sequence[dict], marked: list[dict], texts: list[str]
) -> list[tuple[str, bool]]:
    """The rendered conversation as (piece, written by the template) pairs, in order. The template must write
    each text once, as it is: otherwise the prompt would differ from transformers' or mix text into the
    template's own pieces."""
    parts = _MARK.split(template.render(marked))  # marks' indices at odd positions
    if sorted(int(k) for k in parts[1::2]) != list(range(len(texts))):
        raise CheckpointError(
            f"the chat template wrote {len(parts) // 2} message texts for the {len(texts)} given (it drops or "
            "repeats some): use the model's published chat template"
        )
    pieces = [(texts[int(part)], False) if i % 2 else (part, True) for i, part in enumerate(parts)]
    if "".join(piece for piece, _ in pieces) != template.render(messages):
        raise CheckpointError(
            "the chat template changes message text (trims, escapes or tests it), so its own tokens cannot be "
            "told from the text: use the model's published chat template"
        )
    return pieces


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
