"""POST /v1/chat/completions: parse, preprocess off the event loop, queue for the worker, then stream the tokens as
server-sent events or collect them into one response.

    body ─parse_request─▶ ChatRequest ─thread: media, chat template, buckets─▶ Job ─Scheduler─▶ Token… Done
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from mindvl.errors import MindVLError
from mindvl.runtime import Runtime
from mindvl.runtime.sampling import Sampling
from mindvl.serve.errors import ServeError, from_mindvl
from mindvl.serve.media import MediaPolicy
from mindvl.serve.metrics import Metrics
from mindvl.serve.responses import DONE, Envelope, StopText, sse
from mindvl.serve.scheduler import Done, Job, Scheduler, Token
from mindvl.serve.schema import ChatRequest, Limits, Message, parse_request
from mindvl.serve.shapelog import MediaShapes, ShapeLog, read_media_shapes
from mindvl.shapes.buckets import BucketSpec, TextBucketError, TextChoice, choose_text_buckets
from mindvl.shapes.prompt import text_tokens


class Completions:
    def __init__(self, runtime: Runtime, scheduler: Scheduler, metrics: Metrics, media: MediaPolicy,
                 model_name: str, max_in_flight: int, limits: Limits, shape_log: ShapeLog | None = None) -> None:
        self.runtime, self.scheduler, self.metrics, self.media = runtime, scheduler, metrics, media
        self.model_name, self.max_in_flight, self.limits, self.shape_log = model_name, max_in_flight, limits, shape_log
        self.in_flight = 0  # requests past parsing and not yet answered; only touched on the event loop

    async def __call__(self, request: Request) -> Response:
        arrived, arrived_at = time.perf_counter(), time.time()
        try:
            body = await request.body()
        except ClientDisconnect:
            raise ServeError(499, "the client closed the connection before sending the whole body") from None
        # Parsing a large body takes long enough to hold up every other connection: it runs off the event loop.
        chat = await anyio.to_thread.run_sync(parse_request, body)
        if chat.model != self.model_name:
            raise ServeError(404, f"model {chat.model[:100]!r} does not exist; this server serves "
                                  f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        self.limits.check(chat)
        if self.in_flight >= self.max_in_flight:
            raise ServeError(429, f"the server has {self.in_flight} requests in flight, its limit "
                                  "(--max-concurrency); retry after the time in Retry-After",
                             code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += 1
        trace = _Trace(arrived, arrived_at, _Budget(chat.token_limit, self.runtime.buckets))
        job: Job | None = None
        streaming = False

        def close() -> None:
            self.in_flight -= 1
            ended = time.perf_counter()
            self.metrics.observe("mindvl_request_duration_seconds", ended - arrived)
            if job is not None:
                job.cancelled = True  # a no-op once the job is done; else the worker frees its row
            if self.shape_log is not None and trace.media is not None:
                self._log_shapes(trace, ended)

        try:
            job = await anyio.to_thread.run_sync(self._job, chat, trace, asyncio.get_running_loop())
            self.scheduler.submit(job)
            envelope = Envelope(self.model_name)
            if chat.stream:
                streaming = True  # from here the stream closes the job when it ends, however it ends
                return EventStream(self._chunks(job, chat, envelope, trace), on_close=close)
            return JSONResponse(await self._collect(job, chat, envelope, trace, request.receive))
        finally:
            if not streaming:
                close()

    def _job(self, chat: ChatRequest, trace: _Trace, loop: asyncio.AbstractEventLoop) -> Job:
        """Everything but the graphs, cheapest first: the sampling settings, the media headers, the prompt's
        tokens against the server's buckets, and only then the pixels."""
        try:
            sampling = Sampling(chat.temperature, chat.top_p, 0, chat.seed)
        except MindVLError as e:
            raise from_mindvl(e) from None
        messages, images, videos = self._conversation(chat.messages)
        if self.shape_log is not None:
            # Each header is read a second time (the processor reads it again): a video's bucket choice does not
            # keep the container's frame rate, and a request refused below is logged too.
            trace.media = read_media_shapes(images, videos)
            processor = self.runtime.processor
            trace.text_tokens = text_tokens(processor.tokenizer, processor.chat_template, messages)
        budget = trace.budget
        try:
            prepared = self.runtime.processor.prepare_chat(messages, images, videos, check_length=budget)
        except MindVLError as e:
            raise from_mindvl(e, "messages") from None
        return Job(prepared, self.runtime.prompt_keys(prepared), budget.max_new_tokens, budget.text, sampling, loop)

    def _log_shapes(self, trace: _Trace, ended: float) -> None:
        last = trace.last_token if trace.last_token is not None else ended
        self.shape_log.write(time=trace.arrived_at, duration_s=last - trace.arrived, media=trace.media,
                             prompt_tokens=trace.budget.prompt_tokens, text_tokens=trace.text_tokens,
                             max_tokens=trace.budget.max_new_tokens,
                             generated_tokens=trace.generated)

    def _conversation(self, messages: list[Message]) -> tuple[list[dict], list, list]:
        """The messages in the chat template's form, and the images and videos their parts refer to, in order."""
        turns, images, videos = [], [], []
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for system
            if isinstance(message.content, str):
                turns.append({"role": role, "content": message.content})
                continue
            parts = []
            for j, part in enumerate(message.content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                elif part.type == "image_url":
                    images.append(self.media.image(part.image_url.url, where))
                    parts.append({"type": "image"})
                else:
                    videos.append(self.media.video(part.video_url.url, where))
                    parts.append({"type": "video"})
            turns.append({"role": role, "content": parts})
        return turns, images, videos

    async def _tokens(self, job: Job, trace: _Trace) -> AsyncIterator[Token | Done]:
        """The job's tokens then its Done, timed for the metrics; raises the job's error."""
        while True:
            event = await job.events.get()
            if isinstance(event, ServeError):
                raise event
            if isinstance(event, Token):
                now = time.perf_counter()
                if trace.last_token is None:
                    self.metrics.observe("mindvl_time_to_first_token_seconds", now - trace.arrived)
                else:
                    self.metrics.observe("mindvl_time_per_output_token_seconds", now - trace.last_token)
                trace.last_token = now
            yield event
            if isinstance(event, Done):
                return

    async def _answer(self, job: Job, chat: ChatRequest, trace: _Trace) -> AsyncIterator[tuple[str, str, int]]:
        """(text piece, finish reason so far, tokens so far) per token, with the request's stop strings applied."""
        stops, count = StopText(chat.stops), 0
        async for event in self._tokens(job, trace):
            if isinstance(event, Done):
                yield stops.flush(), event.finish_reason, count
                return
            count += 1
            trace.generated = count
            yield stops.push(event.text), "stop" if stops.stopped else "length", count
            if stops.stopped:
                return

    async def _collect(self, job: Job, chat: ChatRequest, envelope: Envelope, trace: _Trace,
                       receive: Receive) -> dict:
        watcher = asyncio.create_task(_until_disconnect(receive, job))
        try:
            text, finish, count = [], "length", 0
            async for piece, finish, count in self._answer(job, chat, trace):  # noqa: B007 (the last ones count)
                text.append(piece)
            return envelope.completion("".join(text), finish, job.prompt_tokens, count, job.cached_tokens)
        finally:
            watcher.cancel()

    async def _chunks(self, job: Job, chat: ChatRequest, envelope: Envelope, trace: _Trace) -> AsyncIterator[bytes]:
        yield envelope.chunk({"role": "assistant", "content": ""})
        finish, count = "length", 0
        try:
            async for piece, finish, count in self._answer(job, chat, trace):  # noqa: B007 (the last ones count)
                if piece:
                    yield envelope.chunk({"content": piece})
        except ServeError as e:  # the status line is sent already: the error goes in the stream, as OpenAI does
            yield sse(e.body())
            yield DONE
            return
        yield envelope.chunk({}, finish)
        if chat.stream_options and chat.stream_options.include_usage:
            yield envelope.usage_chunk(job.prompt_tokens, count, job.cached_tokens)
        yield DONE


class _Budget:
    """Once a prompt's tokens are counted: its text buckets at the server's batch size (`shapes.buckets` decides; a
    prompt longer than every prefill bucket is prefilled in chunks), or a refusal worded for a client, who cannot add
    buckets. max_tokens defaults to what fits the largest cache."""

    def __init__(self, token_limit: int | None, buckets: BucketSpec) -> None:
        self.token_limit, self.buckets = token_limit, buckets
        self.prompt_tokens, self.max_new_tokens = 0, token_limit or 0  # with the default once the prompt is counted
        self.text: TextChoice | None = None  # once the prompt is counted and admitted

    def __call__(self, length: int) -> None:
        largest = self.buckets.cache[-1]
        max_new = self.token_limit or max(1, largest - length)
        self.prompt_tokens, self.max_new_tokens = length, max_new  # kept for --log-shapes however it is judged
        try:
            self.text = choose_text_buckets(length, max_new, self.buckets, self.buckets.batch[-1])
        except TextBucketError:
            if length >= largest:
                raise ServeError(400, f"the prompt is {length} tokens, more than this server's largest KV cache "
                                      f"({largest} tokens) holds with room for an answer; shorten it or send fewer "
                                      "or smaller images", param="messages", code="context_length_exceeded") from None
            raise ServeError(400, f"the prompt ({length} tokens) + max_tokens ({max_new}) is more than this "
                                  f"server's largest KV cache ({largest} tokens); lower max_tokens to "
                                  f"<= {largest - length}", param="max_tokens",
                             code="context_length_exceeded") from None


class _Trace:
    """One request as it goes, for the metrics and its --log-shapes line: its media's shapes and its budget (set
    off the event loop before its job is queued), its tokens (on the event loop)."""

    def __init__(self, arrived: float, arrived_at: float, budget: _Budget) -> None:
        self.arrived, self.arrived_at, self.budget = arrived, arrived_at, budget  # perf_counter, Unix time
        self.media: MediaShapes | None = None  # with --log-shapes, once its media's headers are read
        self.text_tokens = 0  # with --log-shapes: its prompt's tokens but the visual ones
        self.generated = 0  # tokens delivered to the client, as its usage counts them
        self.last_token: float | None = None


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` when the stream ends however it ends: finished, failed, or the
    client gone (Starlette then cancels the stream)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _until_disconnect(receive: Receive, job: Job) -> None:
    """Once the body is read, the next ASGI message is the disconnect: then stop the job and wake its reader."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True
    job.events.put_nowait(ServeError(499, "the client closed the connection"))
