"""A batch job on one machine: the engine's continuous batching (engine/scheduler.py) fed by a
thread pool that decodes and preprocesses the next inputs while the model runs.

Each input joins the scheduler as soon as a lane is free and its pixels are ready, and leaves
when its answer ends, so one slow input never holds a batch back. Rows come out as answers
finish (not in input order): the caller commits them.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from ..generate import GenerationConfig
from .inputs import Item
from .rows import conversation, error_row, result_row


def _encode(pipe, item: Item, system: str | None, max_frames: int | None, media):
    return pipe.encode(conversation(item, system, max_frames, media))


def _problem(e: Exception) -> str:
    """A bad input's error text: our own errors name the file and the problem already."""
    return str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


def caption_rows(pipe, items: list[Item], cfg: GenerationConfig, model: str, width: int = 16,
                 system: str | None = None, max_frames: int | None = None, media: dict | None = None,
                 threads: int | None = None) -> Iterator[dict]:
    """One row per item, yielded as each finishes. `media` maps an item's index to its image
    already decoded (an array), or to the error that decoding it raised (the Ray path)."""
    if not items:
        return
    width = max(1, min(width, pipe.runner.max_slots, len(items)))
    scheduler = pipe.scheduler(width)
    pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1), thread_name_prefix="meganeura-decode")
    media = media or {}
    todo, ahead, owners = iter(items), deque(), {}

    def read_ahead() -> None:  # two batches decoded ahead keep every lane fed
        while len(ahead) < 2 * width and (item := next(todo, None)) is not None:
            source = media.get(item.index)
            if isinstance(source, Exception):
                ahead.append((item, source))
            else:
                ahead.append((item, pool.submit(_encode, pipe, item, system, max_frames, source)))

    try:
        read_ahead()
        while ahead or not scheduler.idle:
            # Admit what is decoded; wait for the next input only when nothing is running.
            while ahead and scheduler.open_lanes > 0 and (scheduler.idle or _ready(ahead[0][1])):
                item, job = ahead.popleft()
                read_ahead()
                try:
                    if isinstance(job, Exception):
                        raise job
                    enc = job.result()
                    seq = scheduler.add(pipe.prompt(enc), _fitted(cfg, pipe, len(enc.input_ids)))
                except Exception as e:  # this input is bad (unreadable, too large, too long): its row says why
                    yield error_row(item, _problem(e), model)
                    continue
                if seq.finish_reason is not None:  # max_new_tokens 0: finished on arrival
                    yield result_row(item, seq.result(), model)
                else:
                    owners[seq] = item
            if scheduler.idle:
                continue
            for seq, _ in scheduler.step():
                if seq.finish_reason is None:
                    continue
                item = owners.pop(seq)
                yield (error_row(item, _problem(seq.error), model) if seq.error is not None
                       else result_row(item, seq.result(), model))
    finally:
        scheduler.cancel_all()
        pool.shutdown(wait=True, cancel_futures=True)


def _ready(job) -> bool:
    return isinstance(job, Exception) or job.done()


def _fitted(cfg: GenerationConfig, pipe, prompt_tokens: int) -> GenerationConfig:
    """Stop at the context's end rather than refuse, as pipe.generate does."""
    room = pipe.runner.max_seq - prompt_tokens
    return dataclasses.replace(cfg, max_new_tokens=room) if cfg.max_new_tokens > room else cfg
