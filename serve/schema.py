"""The chat-completions request: what mindvl serve accepts of OpenAI's protocol, checked before any work starts.

Malformed JSON, fields mindvl cannot honour and values out of range (a negative seed, top_p above 1) are 400s that
name the field and the fix, as OpenAI answers them; a body whose fields have the wrong types or shapes is a 422
naming the first bad field. A field OpenAI defines that mindvl ignores would
silently change an answer, so such fields are refused unless they carry their no-op value (`n: 1`).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mindvl.runtime.sampling import MAX_SEED
from mindvl.serve.errors import ServeError

# OpenAI's own limit on stop strings, and a length that keeps matching them cheap.
MAX_STOPS, MAX_STOP_CHARS = 4, 256


class _Strict(BaseModel):
    # No coercion ("5" is not 5) and no unknown keys.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's resolution hint; buckets decide here


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part]]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)  # mindvl's default: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Union[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)],
                list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], None] = Field(None, min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs; no effect on the answer

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatRequest:
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send only one of them")
        return self

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOPS:
            raise ValueError(f"{len(stop)} stop strings; send at most {MAX_STOPS}")
        return stop

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


@dataclass(frozen=True)
class Limits:
    """What one request may hold (mindvl serve's flags), checked before anything in it is decoded or tokenized."""

    images: int = 16
    videos: int = 2
    parts: int = 64  # content parts over all messages, a message whose content is a string counting as one
    text_chars: int = 64 * 1024  # characters of text over all messages

    def check(self, chat: ChatRequest) -> None:
        strings = [m.content for m in chat.messages if isinstance(m.content, str)]
        parts = [part for m in chat.messages if not isinstance(m.content, str) for part in m.content]
        texts = strings + [p.text for p in parts if p.type == "text"]
        counts = ((len(strings) + len(parts), self.parts, "content parts", "--max-parts"),
                  (sum(p.type == "image_url" for p in parts), self.images, "images", "--max-images"),
                  (sum(p.type == "video_url" for p in parts), self.videos, "videos", "--max-videos"),
                  (sum(map(len, texts)), self.text_chars, "characters of text", "--max-text-chars"))
        for count, limit, what, flag in counts:
            if count > limit:
                raise ServeError(400, f"the request has {count} {what}, more than the {limit} this server takes "
                                      f"per request ({flag}); send fewer", param="messages")


SUPPORTED = tuple(ChatRequest.model_fields)
# OpenAI fields accepted only at their no-op value, and the fix for any other value.
NO_OP = {"n": (1, "mindvl serve returns one choice per request; send separate requests (with different seeds)"),
         "presence_penalty": (0, "mindvl serve applies no penalties; remove it"),
         "frequency_penalty": (0, "mindvl serve applies no penalties; remove it"),
         "logprobs": (False, "mindvl serve does not return log probabilities; remove it")}


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ServeError(400, f"the body is not valid JSON ({str(e)[:120]}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ServeError(400, f"the body is a JSON {type(data).__name__}, not an object; send "
                              '{"model": ..., "messages": [...]}')
    _refuse_lone_surrogates(data, "")
    for key, value in data.items():
        if key in NO_OP:
            neutral, fix = NO_OP[key]
            if value is not None and value != neutral:
                raise ServeError(400, f"{key}={json.dumps(value)} is not supported: {fix}", param=key)
        elif key not in SUPPORTED:
            close = difflib.get_close_matches(key, SUPPORTED, n=1)
            hint = f"did you mean {close[0]!r}? " if close else "remove it; "
            raise ServeError(400, f"unsupported field {key!r}: {hint}mindvl serve takes {', '.join(SUPPORTED)}",
                             param=key)
    try:
        return ChatRequest.model_validate({k: v for k, v in data.items() if k not in NO_OP})
    except ValidationError as e:
        raise _invalid(e) from None


def _refuse_lone_surrogates(value: Any, path: str) -> None:
    """JSON's "\\ud800" escapes give strings that are not Unicode text: no tokenizer or file system takes them,
    so they are refused here, by their place in the body, rather than fail deep inside."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ServeError(400, f"{path or 'body'}: not valid Unicode text (a lone surrogate at character "
                                  f"{e.start}); send UTF-8 text", param=path or None) from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, path)
            _refuse_lone_surrogates(item, _join(path, key))


# pydantic's error types for a value of the right type that the field does not allow.
OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "too_short",
                "too_long", "string_too_short", "string_too_long", "value_error"}


def _invalid(e: ValidationError) -> ServeError:
    """A 400 (a value out of range) or 422 (a wrong type or shape) naming the bad field by its JSON path
    (messages[0].content[1].image_url.url)."""
    # Of the errors of a union's branches, the deepest is the one about what the client meant to send.
    first = max(e.errors(), key=lambda error: len(error["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        path = _join(_path(first["loc"][:-1]), str(first["loc"][-1]))
        message = "unsupported field; remove it"
    else:
        path = _path(first["loc"])
        if first["type"] != "missing" and _scalar(first["input"]):
            message += f", got {json.dumps(first['input'])[:60]}"
    status = 400 if first["type"] in OUT_OF_RANGE else 422
    return ServeError(status, f"{path or 'body'}: {message}", param=path or None)


def _path(loc: tuple) -> str:
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        # Other entries name union branches, and a part's discriminator tag comes before its own field.
        elif part in _FIELD_NAMES and (i == 0 or part != loc[i - 1]):
            path = _join(path, part)
    return path


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for m in models for name in m.model_fields)


_FIELD_NAMES = _field_names(ChatRequest, Message, TextPart, ImagePart, VideoPart, MediaURL, StreamOptions)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
