"""What a generation asks for and gives back: settings (`GenerationConfig`), results, prompts,
streaming text that never splits a character or shows part of a stop string, and
`generate_stream`, which drives the engine's scheduler (engine/scheduler.py) for the Python API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .engine.sampler import SamplingParams


@dataclass(frozen=True)
class GenerationConfig(SamplingParams):
    """Sampling settings (engine/sampler.py) plus when to stop."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.ignore_eos and self.constraint is not None:
            raise ValueError("ignore_eos cannot go with a constraint: the grammar decides where the answer ends")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str                # "stop" (end token or stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    timings: dict = field(default_factory=dict)
    cached_tokens: int = 0            # prompt tokens whose keys and values came from the prefix cache


@dataclass
class Prompt:
    """One sequence to generate from: token ids and, for images, features and their rows."""

    token_ids: np.ndarray
    image_features: object = None     # backend array [image tokens, hidden] or None
    image_rows: np.ndarray | None = None
    image_keys: list[bytes] | None = None  # per image row, the content hash of its pixels (prefix-cache keys)


class TextStream:
    """Turns a growing token list into text pieces: holds back an incomplete UTF-8 character
    and any tail that could still become a stop string, and finds stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode, self.stop = decode, stop
        self.tokens: list[int] = []
        self.emitted = 0
        self.stopped = False

    def text(self) -> str:
        text = self.decode(self.tokens)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                text = text[:at]
        return text

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.text()
        safe = len(text)
        if not self.stopped:
            if text.endswith("\ufffd"):
                safe -= 1  # a multi-byte character is still arriving
            for s in self.stop:  # a tail that is a prefix of a stop string may yet complete it
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        return self._emit(text, safe)

    def flush(self) -> str:
        text = self.text()
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        piece = text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def generate_stream(runner, prompts: list[Prompt], cfg: GenerationConfig, eos_ids: set[int],
                    decode: Callable[[list[int]], str], sampler=None,
                    prefix_cache: bool = True) -> Iterator[tuple[int, str]]:
    """Yield (sequence index, text piece) as tokens arrive; returns the results via StopIteration.

    More prompts than the batch (or the cache) holds is fine: the rest wait and join as
    others finish. Closing the generator early (an abandoned stream) frees what it held."""
    from .engine.scheduler import Scheduler

    scheduler = Scheduler(runner, eos_ids, decode, min(len(prompts), runner.max_slots) or 1, sampler,
                          prefix_cache=prefix_cache)
    seqs = [scheduler.add(p, cfg) for p in prompts]  # length errors before any model work
    index = {seq: i for i, seq in enumerate(seqs)}
    try:
        while not scheduler.idle:
            for seq, piece in scheduler.step():
                if seq.error is not None:
                    raise seq.error
                if piece:
                    yield index[seq], piece
    finally:
        scheduler.cancel_all()
    return [s.result() for s in seqs]


def drain(gen) -> list[GenerationResult]:
    """Run a `generate_stream` generator to the end and return its results."""
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
