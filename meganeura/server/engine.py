"""The engine: one thread owns the model runner and drives the continuous-batching scheduler;
asyncio request handlers talk to it through `Job`s.

Handlers prepare a request (images decoded, prompt tokenized) in a worker thread, then
`submit` it to a bounded queue. Between decode steps the engine admits queued jobs into free
slots (running the vision encoder, which touches the runner, here), drops cancelled ones and
sends each job's text pieces back to its event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..generate import GenerationConfig, GenerationResult

log = logging.getLogger("meganeura.server")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass(eq=False)
class Job:
    """One request between its handler (on the event loop) and the engine thread."""

    encoded: object                       # pipeline.Encoded; dropped once the engine has its prompt
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False               # set by the handler; the engine drops the job at its next step
    arrived: float = field(default_factory=time.perf_counter)   # when the HTTP request came in (for latency)
    logprobs_sent: int = 0                # answer tokens whose log-probabilities have been sent
    on_drop: Callable[[], None] | None = None   # called once `encoded` is dropped (frees a video slot)

    def drop_encoded(self) -> None:
        """Forget the prompt's pixels (in the prompt's features now, or not needed any more)."""
        self.encoded = None
        release, self.on_drop = self.on_drop, None
        if release is not None:
            release()

    # events: ("text", str) and, when asked for, ("logprobs", [TokenLogprob]) before the text its
    # tokens made; then ("done", GenerationResult) or ("error", str)
    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    async def next_event(self) -> tuple[str, str | GenerationResult]:
        return await self.events.get()


class Engine:
    def __init__(self, pipe, max_batch: int, max_queue: int, metrics) -> None:
        self.pipe, self.metrics = pipe, metrics
        self.scheduler = pipe.scheduler(max_batch)
        self.inbox: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.jobs: dict = {}                  # Sequence -> Job, for the running ones
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="meganeura-engine", daemon=True)

    # ---- called from the event loop ---------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self.inbox.put_nowait(None)   # wakes an idle engine
        except queue.Full:
            pass                          # not idle: it sees _stopping after this step
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        try:
            self.inbox.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def queue_depth(self) -> int:
        return self.inbox.qsize() + len(self.scheduler.waiting)

    def running(self) -> int:
        return len(self.scheduler.running)

    # ---- the engine thread --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._admit()
            self._drop_cancelled()
            if self.scheduler.idle:
                continue
            try:
                events = self.scheduler.step()
            except Exception as e:  # a bug, not a bad request (those never get here): fail what ran
                log.exception("decode step failed")
                self._fail_all(f"internal error in the engine: {e}")
                continue
            if self.scheduler.last_decode_batch:
                self.metrics.decode_step(self.scheduler.last_decode_batch)
            self._deliver(events)
        self._fail_all("the server is shutting down")
        while not self.inbox.empty():
            job = self.inbox.get_nowait()
            if job is not None:
                job.drop_encoded()
                job.send("error", "the server is shutting down")

    def _admit(self) -> None:
        """Move queued jobs into free slots; sleeps only when there is nothing to run."""
        while self.scheduler.open_lanes > 0:
            try:
                job = self.inbox.get(block=self.scheduler.idle)
            except queue.Empty:
                return
            if job is None:
                return
            if job.cancelled:  # its client left while it waited
                job.drop_encoded()
                continue
            if self._stopping:
                job.drop_encoded()
                job.send("error", "the server is shutting down")
                return
            try:
                seq = self.scheduler.add(self.pipe.prompt(job.encoded), job.cfg)
            except Exception as e:  # only this job fails; the batch goes on
                log.exception("could not start a request")
                job.drop_encoded()
                job.send("error", f"could not start the request: {e}")
                continue
            job.drop_encoded()  # the pixels are in the prompt's features now
            self.jobs[seq] = job

    def _drop_cancelled(self) -> None:
        for seq, job in list(self.jobs.items()):
            if job.cancelled:
                self.scheduler.cancel(seq)  # frees its slot for this very step
                del self.jobs[seq]

    def _deliver(self, events) -> None:
        for seq, piece in events:
            job = self.jobs[seq]
            if job.cfg.logprobs is not None and len(seq.tokens) > job.logprobs_sent:  # an end token is not sent
                job.send("logprobs", self.scheduler.sampler.logprobs.of(seq)[job.logprobs_sent:len(seq.tokens)])
                job.logprobs_sent = len(seq.tokens)
            if piece:
                job.send("text", piece)
            if seq.finish_reason is None:
                continue
            del self.jobs[seq]
            if seq.error is not None:
                job.send("error", f"the request failed: {seq.error}")
            else:
                job.send("done", seq.result())

    def _fail_all(self, message: str) -> None:
        for seq, job in list(self.jobs.items()):
            self.scheduler.cancel(seq)
            job.send("error", message)
        self.jobs.clear()
