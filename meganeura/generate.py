"""Model-agnostic generation: prefill once, then one decode step per token, with sampling,
stop tokens, stop strings and streaming text that never splits a character.

Works on any `Runtime`: sequences are prefilled one by one into their own cache slots and
then decoded together, one batched step per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling settings: temperature={self.temperature} (>= 0), top_p={self.top_p} "
                             f"(0, 1], top_k={self.top_k} (>= 0), repetition_penalty={self.repetition_penalty} (> 0)")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str                # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    timings: dict = field(default_factory=dict)


@dataclass
class Prompt:
    """One sequence to generate from: token ids and, for images, features and their rows."""

    token_ids: np.ndarray
    image_features: object = None     # backend array [image tokens, hidden] or None
    image_rows: np.ndarray | None = None


def sample(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, history) -> int:
    """Pick the next token from one row of logits (host-side, float64 for the softmax)."""
    x = logits.astype(np.float64)
    if cfg.repetition_penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history))
        x[seen] = np.where(x[seen] > 0, x[seen] / cfg.repetition_penalty, x[seen] * cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(np.argmax(x))
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.size:
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        drop = order[cum - p[order] >= cfg.top_p]  # keep the smallest set reaching top_p
        p[drop] = 0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


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


class _Sequence:
    def __init__(self, slot, prompt, cfg, decode):
        self.slot, self.prompt, self.cfg = slot, prompt, cfg
        self.stream = TextStream(decode, cfg.stop)
        self.rng = np.random.default_rng(cfg.seed)
        self.position = len(prompt.token_ids)
        self.finish_reason = None
        self.pieces: list[str] = []


def generate_stream(runtime, prompts: list[Prompt], cfg: GenerationConfig, eos_ids: set[int],
                    decode: Callable[[list[int]], str]) -> Iterator[tuple[int, str]]:
    """Yield (sequence index, text piece) as tokens arrive; returns the results via StopIteration."""
    if len(prompts) > runtime.num_slots:
        raise ValueError(f"{len(prompts)} sequences but the runtime has {runtime.num_slots} cache slots")
    seqs = [_Sequence(i, p, cfg, decode) for i, p in enumerate(prompts)]
    for s in seqs:
        if s.position + cfg.max_new_tokens > runtime.max_seq:
            raise ValueError(f"prompt of {s.position} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                             f"context of {runtime.max_seq} tokens")
    t0 = time.perf_counter()
    next_logits = []
    for s in seqs:
        n = s.position
        logits = runtime.step(s.prompt.token_ids, np.arange(n), np.full(n, s.slot), [n - 1],
                              s.prompt.image_features, s.prompt.image_rows)
        next_logits.append(runtime.to_host(logits)[0])
    t1 = time.perf_counter()
    active = [s for s in seqs if cfg.max_new_tokens > 0]
    for s in seqs:
        if cfg.max_new_tokens == 0:
            s.finish_reason = "length"
    rows = dict(zip(range(len(seqs)), next_logits))
    decoded = 0  # tokens produced by decode steps, over all sequences
    while active:
        still = []
        for s in active:
            # the history only matters to the repetition penalty: don't rebuild it per token otherwise
            history = list(s.prompt.token_ids) + s.stream.tokens if cfg.repetition_penalty != 1.0 else ()
            token = sample(rows[s.slot], cfg, s.rng, history)
            if token in eos_ids and not cfg.ignore_eos:
                s.finish_reason = "stop"
            else:
                piece = s.stream.push(token)
                if piece:
                    yield s.slot, piece
                if s.stream.stopped:
                    s.finish_reason = "stop"
                elif len(s.stream.tokens) >= cfg.max_new_tokens:
                    s.finish_reason = "length"
                else:
                    still.append(s)
        active = still
        if not active:
            break
        logits = runtime.to_host(runtime.step([s.stream.tokens[-1] for s in active], [s.position for s in active],
                                              [s.slot for s in active], list(range(len(active)))))
        decoded += len(active)
        for i, s in enumerate(active):
            s.position += 1
            rows[s.slot] = logits[i]
    t2 = time.perf_counter()
    results = []
    for s in seqs:
        tail = s.stream.flush()
        if tail:
            yield s.slot, tail
        new = len(s.stream.tokens)
        results.append(GenerationResult(
            text=s.stream.text(), token_ids=list(s.stream.tokens), finish_reason=s.finish_reason,
            prompt_tokens=len(s.prompt.token_ids),
            timings={"prefill_s": t1 - t0, "decode_s": t2 - t1,
                     "tokens_per_s": decoded / (t2 - t1) if decoded else 0.0, "new_tokens": new}))
    return results


def drain(gen) -> list[GenerationResult]:
    """Run a `generate_stream` generator to the end and return its results."""
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
