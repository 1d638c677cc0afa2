"""The worker thread, the only one that calls MindSpore: it takes queued jobs into the batch, steps the batch, and
hands every token back to the event loop, which only queues, streams and cancels.

Policy. The batch runs at the artifact's largest batch bucket B, so a request that arrives while others decode
takes a free row at the next step (with batch [1] requests are served one at a time). The batch's cache bucket C is
chosen when it starts empty: the largest of the caches the first B waiting requests each take
(`choose_text_buckets`), and of that bucket's cache sets the one holding the longest prefix of one of them
(`runtime/pool.py`). Requests join in arrival order, each into the free row that holds the longest prefix of its
prompt; one that needs more than C waits, and those behind it with it, until the batch empties and restarts at a
larger C, so none starves. A step is at most one prefill call (one chunk of every row still prefilling) and then
one decode step of the other rows.

Failures. Whatever fails while a request is admitted (its vision graphs), prefilled, decoded or sampled fails that
request alone with a 500 (the traceback goes to the log); its row is freed and the other rows go on, each with
exactly its single-request answer (`runtime/batch.py` retries a failed graph call row by row). The worker notes
the time of every step it completes, so /health can tell a worker that is stuck from one that is busy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from mindvl.errors import MindVLError
from mindvl.runtime import Runtime
from mindvl.runtime.batch import Batch
from mindvl.runtime.generation import Generation
from mindvl.runtime.sampling import Sampling
from mindvl.serve.errors import ServeError, from_mindvl
from mindvl.serve.metrics import Metrics
from mindvl.shapes.buckets import TextChoice, choose_text_buckets
from mindvl.shapes.processor import Prepared

log = logging.getLogger("mindvl.serve")


@dataclass(frozen=True)
class Token:
    text: str  # the text this token completes; "" while a character's bytes are still arriving


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


class Job:
    """One chat completion: what the worker needs, and the queue its tokens come back on."""

    def __init__(self, prepared: Prepared, keys: np.ndarray, max_new_tokens: int, text: TextChoice,
                 sampling: Sampling, loop: asyncio.AbstractEventLoop) -> None:
        self.prepared, self.keys, self.max_new_tokens, self.text = prepared, keys, max_new_tokens, text
        self.sampling, self.prompt_tokens = sampling, prepared.input_ids.shape[1]
        self.cached_tokens = 0  # set by the worker when the job joins a batch: prompt tokens its row held already
        self.events: asyncio.Queue[Token | Done | ServeError] = asyncio.Queue()
        self.cancelled = False  # set on the event loop; the worker drops the job at its next step
        self._loop = loop

    def send(self, event: Token | Done | ServeError) -> None:
        """From the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Scheduler:
    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime, self.metrics = runtime, metrics
        self.batch_size = runtime.buckets.batch[-1]
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._running: dict[Generation, Job] = {}
        self._thread = threading.Thread(target=self._run, name="mindvl-worker", daemon=True)
        self._idle = True  # waiting for a job, so not expected to make progress
        self._progress = time.monotonic()  # when the worker last completed a step or woke up

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet in the batch."""
        return self._inbox.qsize() + len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the worker has had work and completed no step; 0 while it is idle."""
        return 0.0 if self._idle else time.monotonic() - self._progress

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def stop(self) -> None:
        """Finish the current step, then fail what is still queued or running with a 503."""
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        batch: Batch | None = None
        while self._collect(block=batch is None and not self._waiting):
            batch = self._drop_cancelled(batch)
            if batch is None and self._waiting:
                batch = self._open()
            if batch is None:
                continue
            try:
                self._admit(batch)
                if batch.active:
                    self._step(batch)
                    self._beat()
            except Exception:  # a bug of the scheduler itself: fail this batch's requests, keep serving
                log.exception("generation step failed")
                self._fail(list(self._running.values()), ServeError(500, "generation failed inside the server; "
                                                                         "see the server log, then retry"))
                for generation in batch.active:
                    batch.remove(generation)
                self._running.clear()
                batch = None
        leftover = [*self._waiting, *self._running.values()]
        while not self._inbox.empty():
            leftover.append(self._inbox.get())
        self._fail([job for job in leftover if job], ServeError(503, "the server is shutting down; retry later"))

    def _step(self, batch: Batch) -> None:
        calls = batch.prefill_calls, batch.decode_calls, batch.decoded_rows
        self._deliver(batch.step())
        self.metrics.count("mindvl_prefill_calls_total", batch.prefill_calls - calls[0])
        self.metrics.count("mindvl_decode_steps_total", batch.decode_calls - calls[1])
        self.metrics.count("mindvl_decode_rows_total", batch.decoded_rows - calls[2])

    def _beat(self) -> None:
        self._progress = time.monotonic()

    def _collect(self, block: bool) -> bool:
        """Move submitted jobs to the waiting line (waiting for one when idle); False once stopping."""
        try:
            if block:
                self._idle = True
                job = self._inbox.get()
                self._beat()
                self._idle = False
            else:
                job = self._inbox.get_nowait()
            while True:
                if job is None:
                    return False
                self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self, batch: Batch | None) -> Batch | None:
        waiting = deque(job for job in self._waiting if not job.cancelled)
        self.metrics.count("mindvl_cancelled_total", len(self._waiting) - len(waiting))
        self._waiting = waiting
        for generation, job in list(self._running.items()):
            if job.cancelled:
                batch.remove(generation)
                del self._running[generation]
                self.metrics.count("mindvl_cancelled_total")
        return batch if batch is not None and batch.active else None

    def _open(self) -> Batch:
        """A batch at the cache the first B waiting requests need (the largest of the caches each would take), in
        the cache set that holds the longest prefix of one of them."""
        first = list(itertools.islice(self._waiting, self.batch_size))
        capacity = max(job.text.cache for job in first)
        return self.runtime.pool.batch(self.batch_size, [capacity], [job.keys for job in first])

    def _admit(self, batch: Batch) -> None:
        """Waiting jobs, in order, into the free rows while they fit the batch's cache, each into the row holding
        the longest prefix of its prompt; their vision graphs run here (not for images in that prefix)."""
        while self._waiting and batch.free and self._waiting[0].text.cache <= batch.capacity:
            job = self._waiting.popleft()
            try:
                prompt = self.runtime.encode(job.prepared, skip_before=batch.reusable(job.keys), keys=job.keys)
                generation = self.runtime.new_generation(prompt, job.max_new_tokens, job.sampling)
                batch.add(generation)
            except MindVLError as e:
                job.send(from_mindvl(e))
                continue
            except Exception as e:
                self._failed(job, e)
                continue
            finally:
                self._beat()
            self._running[generation] = job
            job.cached_tokens = generation.start  # read by the event loop once the job's first event arrives
            self.metrics.count("mindvl_prompt_tokens_total", job.prompt_tokens)
            self.metrics.count("mindvl_vision_cache_hits_total", prompt.vision_cache_hits)
            if generation.start:
                self.metrics.count("mindvl_prefix_hits_total")
                self.metrics.count("mindvl_prefix_reused_tokens_total", generation.start)
            self._count_buckets(job, batch, generation.start)

    def _count_buckets(self, job: Job, batch: Batch, reused: int) -> None:
        """Per graph, what fitting this request to its buckets cost: the series that show when the buckets no longer
        suit the traffic (`mindvl plan`). Every image and video counts, encoded or found in a cache."""
        for visual in job.prepared.visuals:
            graph, fit, groups = self.runtime.vision_graph(visual).name, visual.choice.fit, visual.choice.groups
            self.metrics.count("mindvl_bucket_inputs_total", graph=graph)
            self.metrics.count("mindvl_bucket_padded_tokens_total", round(fit.waste * groups), graph=graph)
            self.metrics.count("mindvl_bucket_lost_tokens_total", round(fit.lost * groups), graph=graph)
        # The rule's last prefill call for this row in this batch, as `Output.buckets` reports it; rows prefilled
        # together run the longest row's call.
        text = choose_text_buckets(job.prompt_tokens, job.max_new_tokens, self.runtime.buckets, batch.size,
                                   batch.capacity, reused)
        graph = self.runtime.artifacts.manifest.find("prefill", batch=text.batch, seq=text.prefill,
                                                     cache=text.cache).name
        self.metrics.count("mindvl_bucket_requests_total", graph=graph)
        self.metrics.count("mindvl_bucket_padded_tokens_total", text.padding_tokens, graph=graph)

    def _deliver(self, results: list[tuple[Generation, str]]) -> None:
        for generation, text in results:
            job = self._running[generation]
            if generation.error is not None:
                self._failed(job, generation.error)
            else:
                job.send(Token(text))
                self.metrics.count("mindvl_completion_tokens_total")
            if generation.finish:
                if generation.error is None:
                    job.send(Done(generation.finish, len(generation.token_ids)))
                del self._running[generation]

    def _failed(self, job: Job, error: Exception) -> None:
        """One request's failure inside the worker: the traceback to the log, a 500 to its client alone."""
        log.error("request failed inside the worker", exc_info=error)
        self.metrics.count("mindvl_worker_failures_total")
        job.send(ServeError(500, "generation failed inside the server for this request; see the server log, then "
                                 "retry"))

    @staticmethod
    def _fail(jobs: list[Job], error: ServeError) -> None:
        for job in jobs:
            job.send(error)
