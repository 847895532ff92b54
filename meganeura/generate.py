"""Model-agnostic generation: prefill once, then one decode step per token, with sampling,
stop tokens, stop strings and streaming text that never splits a character.

Works on any `Runtime`: a `Scheduler` prefills sequences one by one into their own cache
slots and decodes all running ones together, one batched step per token; sequences join and
leave between steps (continuous batching). `generate_stream` (the Python API) and the server's
engine loop both drive it.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
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
    finish_reason: str                # "stop" (end token or stop string), "length", "cancelled" or "error"
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


class Sequence:
    """One answer being generated: its prompt, settings, cache slot and text so far."""

    def __init__(self, prompt: Prompt, cfg: GenerationConfig, decode: Callable[[list[int]], str]) -> None:
        self.prompt, self.cfg = prompt, cfg
        self.stream = TextStream(decode, cfg.stop)
        self.rng = np.random.default_rng(cfg.seed)
        self.slot: int | None = None
        self.position = len(prompt.token_ids)   # where the next token goes in the cache
        self.finish_reason: str | None = None   # "stop", "length", "cancelled" or "error"
        self.error: Exception | None = None
        self.decode_steps = 0                   # tokens that came from decode steps (the first comes from prefill)
        self.prefill_s = self.decode_s = 0.0
        self._decode_start: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.stream.tokens

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.stream.text(), token_ids=list(self.tokens), finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt.token_ids),
            timings={"prefill_s": self.prefill_s, "decode_s": self.decode_s, "new_tokens": len(self.tokens),
                     "tokens_per_s": self.decode_steps / self.decode_s if self.decode_steps else 0.0})


def choose_tokens(runtime, logits, sequences: list[Sequence], rows: list[int]) -> list[int]:
    """The next token of each sequence, from row rows[i] of one step's backend logits.

    The one place where a step's logits become tokens: on the device when the backend can
    (one small copy back), else on the host with `sample`."""
    picked = logits[rows]
    if getattr(runtime.backend, "samples_on_device", False):
        return runtime.backend.choose_tokens(picked, sequences)
    host = runtime.to_host(picked)
    tokens = []
    for seq, x in zip(sequences, host):
        # the history only matters to the repetition penalty: don't rebuild it per token otherwise
        history = list(seq.prompt.token_ids) + seq.tokens if seq.cfg.repetition_penalty != 1.0 else ()
        tokens.append(sample(x, seq.cfg, seq.rng, history))
    return tokens


def prefill_rows(n: int) -> int:
    """A prompt of n tokens runs as this many rows: a multiple of 8, or of 1/16 of n's power
    of two when that is larger. At most ~12% padding, and ~8 plan shapes per doubling of the
    prompt length (each new shape costs a plan build, ~0.3 s on the CPU)."""
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


@dataclass
class _Launch:
    """A decode step sent to the device: its sequences (by slot) and their chosen tokens."""

    seqs: dict[int, Sequence]
    tokens: object            # .result() -> host tokens by slot (a `later` handle or a _Ready)


@dataclass
class _Ready:
    tokens: dict[int, int]

    def result(self) -> dict[int, int]:
        return self.tokens


def _overlappable(seq: Sequence) -> bool:
    """No repetition penalty: the device picks the next token from logits and settings alone."""
    return seq.cfg.repetition_penalty == 1.0


class Scheduler:
    """Continuous batching over one runtime's cache slots: sequences join between decode
    steps and leave when finished or cancelled.

    Each `step()` prefills waiting sequences into free slots (one sequence per prefill), then
    runs one decode step for all running sequences. On a backend that picks tokens on the
    device (`choose_later`), decoding is overlapped (unless `overlap=False`): step k sends
    decode k, whose input tokens are decode k-1's device-side choices, before it waits for
    decode k-1's tokens on the host, so the GPU never idles on the host's bookkeeping. A
    sequence that stops (end token, stop string) at k-1 was computed once more at k; that row
    is dropped. A repetition penalty needs every token on the host: while a sequence with one
    runs, steps go one by one. Both
    shapes are fixed per sequence, never per batch, so a greedy answer is the same whoever
    runs beside it:
    - a prefill is padded by `prefill_rows` (which also bounds how many plans get compiled);
      the padding rows write cache positions that decoding overwrites before anything reads them;
    - a decode step always has one row per slot, row i for slot i; a slot with nothing to
      decode gets a dummy row in its own slot, at a position nothing reads before rewriting.
    It uses the first `slots` cache slots (default: all). The runtime's cache must not be
    re-reserved while a scheduler over it is running.
    """

    def __init__(self, runtime, eos_ids: set[int], decode: Callable[[list[int]], str], slots: int | None = None,
                 overlap: bool = True):
        if slots is not None and not 0 < slots <= runtime.num_slots:
            raise ValueError(f"{slots} slots asked for, the runtime's cache has {runtime.num_slots}")
        self.runtime, self.eos_ids, self.decode = runtime, eos_ids, decode
        self.overlap = overlap and getattr(runtime.backend, "samples_on_device", False)
        self.width = slots or runtime.num_slots
        self.free = list(range(self.width))      # a heap: the lowest free slot goes first
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}   # slot -> sequence
        self.last_decode_batch = 0               # sequences in the last decode step (for metrics)
        self.pending: _Launch | None = None      # an overlapped decode whose tokens are still on the device
        self._in_flight: dict[Sequence, int] = {}
        self._next_tokens = None                 # device [width]: each slot's next input token

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and self.pending is None

    @property
    def free_slots(self) -> int:
        """Slots that no running or waiting sequence will take."""
        return len(self.free) - len(self.waiting)

    def add(self, prompt: Prompt, cfg: GenerationConfig) -> Sequence:
        n = len(prompt.token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + cfg.max_new_tokens > self.runtime.max_seq:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                             f"context of {self.runtime.max_seq} tokens")
        seq = Sequence(prompt, cfg, self.decode)
        if cfg.max_new_tokens == 0:
            seq.finish_reason = "length"
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now; its slot is free for the next step."""
        if seq.finish_reason is not None:
            return
        if seq.slot is None:
            self.waiting.remove(seq)
        else:
            self._release(seq)
        seq.finish_reason = "cancelled"

    def step(self) -> list[tuple[Sequence, str]]:
        """Admit, then decode once. Returns (sequence, new text) for every sequence that moved,
        one pair per sequence (a prefill token and a decode token in the same step are joined);
        a sequence has finished when its `finish_reason` is set."""
        moved: dict[Sequence, str] = {}
        for seq, piece in self._step():
            moved[seq] = moved.get(seq, "") + piece
        return list(moved.items())

    def _step(self) -> list[tuple[Sequence, str]]:
        events = self._admit()
        overlap = self.overlap and all(_overlappable(s) for s in self.running.values())
        if not overlap and self.pending is not None:  # the host needs every token before the next step
            events += self._resolve(self.pending)
            self.pending = None
        launch = self._launch(overlap)
        self.last_decode_batch = len(launch.seqs) if launch else 0
        if overlap and self.pending is not None:
            events += self._resolve(self.pending)
        self.pending = launch if overlap else None
        if launch is not None and not overlap:
            events += self._resolve(launch)
        return events

    def _admit(self) -> list[tuple[Sequence, str]]:
        events = []
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free)
            self.running[seq.slot] = seq
            t0 = time.perf_counter()
            try:
                logits = self._prefill(seq)
            except Exception as e:  # e.g. image features that don't fit: fail this sequence alone
                seq.error = e
                events.append((seq, self._finish(seq, "error")))
                continue
            [token] = choose_tokens(self.runtime, logits, [seq], [0])
            seq._decode_start = time.perf_counter()
            seq.prefill_s = seq._decode_start - t0
            if self._next_tokens is not None:  # the overlapped decode in flight did not have it
                self.runtime.backend.write(self._next_tokens[seq.slot:seq.slot + 1], [token], "u32")
            events.append((seq, self._advance(seq, token)))
        return events

    def _launch(self, overlap: bool) -> _Launch | None:
        """Send one decode step for every running sequence that may still need a token."""
        seqs = {slot: seq for slot, seq in self.running.items()
                if len(seq.tokens) + self._in_flight.get(seq, 0) < seq.cfg.max_new_tokens}
        if not seqs:
            return None
        # row i is slot i; rows of other slots are dummies at a position nothing reads back
        positions = np.zeros(self.width, dtype=np.int64)
        for slot, seq in self.running.items():
            positions[slot] = seq.position
        if self.pending is None:  # every input token is known on the host
            tokens = np.zeros(self.width, dtype=np.int64)
            for slot, seq in seqs.items():
                tokens[slot] = seq.tokens[-1]
        else:  # the decode in flight chose them on the device
            tokens = self._next_tokens
        slots = np.arange(self.width)
        logits = self.runtime.step(tokens, positions, slots, slots)
        for seq in seqs.values():
            seq.position += 1
            self._in_flight[seq] = self._in_flight.get(seq, 0) + 1
        if overlap:
            if self._next_tokens is None:
                self._next_tokens = self.runtime.backend.from_host(np.zeros(self.width), "u32")
            rows = [seqs.get(slot) for slot in range(self.width)]
            return _Launch(seqs, self.runtime.backend.choose_later(logits, rows, self._next_tokens))
        order = list(seqs.items())
        chosen = choose_tokens(self.runtime, logits, [seq for _, seq in order], [slot for slot, _ in order])
        return _Launch(seqs, _Ready({slot: token for (slot, _), token in zip(order, chosen)}))

    def _resolve(self, launch: _Launch) -> list[tuple[Sequence, str]]:
        """Wait for a decode step's tokens and move its sequences on (those that finished or
        were cancelled meanwhile are skipped: their row was a wasted guess)."""
        tokens = launch.tokens.result()
        events = []
        for slot, seq in launch.seqs.items():
            if seq.finish_reason is not None:
                continue
            self._in_flight[seq] -= 1
            seq.decode_steps += 1
            events.append((seq, self._advance(seq, int(tokens[slot]))))
        self._in_flight = {s: n for s, n in self._in_flight.items() if n and s.finish_reason is None}
        return events

    def _prefill(self, seq: Sequence):
        p = seq.prompt
        n = len(p.token_ids)
        rows = min(prefill_rows(n), self.runtime.max_seq)
        ids = np.zeros(rows, dtype=np.int64)
        ids[:n] = p.token_ids
        return self.runtime.step(ids, np.arange(rows), np.full(rows, seq.slot), [n - 1], p.image_features,
                                 p.image_rows)

    def _advance(self, seq: Sequence, token: int) -> str:
        if token in self.eos_ids and not seq.cfg.ignore_eos:
            return self._finish(seq, "stop")
        piece = seq.stream.push(token)
        if seq.stream.stopped:
            return piece + self._finish(seq, "stop")
        if len(seq.tokens) >= seq.cfg.max_new_tokens:
            return piece + self._finish(seq, "length")
        return piece

    def _finish(self, seq: Sequence, reason: str) -> str:
        seq.finish_reason = reason
        self._release(seq)
        if seq._decode_start is not None:
            seq.decode_s = time.perf_counter() - seq._decode_start
        return seq.stream.flush() if reason != "error" else ""

    def _release(self, seq: Sequence) -> None:
        del self.running[seq.slot]
        heapq.heappush(self.free, seq.slot)


def generate_stream(runtime, prompts: list[Prompt], cfg: GenerationConfig, eos_ids: set[int],
                    decode: Callable[[list[int]], str]) -> Iterator[tuple[int, str]]:
    """Yield (sequence index, text piece) as tokens arrive; returns the results via StopIteration.

    More prompts than cache slots is fine: the rest wait and join as slots free up."""
    # as wide as this call's batch: a lone prompt decodes one row even after a wider call
    scheduler = Scheduler(runtime, eos_ids, decode, min(len(prompts), runtime.num_slots) or None)
    seqs = [scheduler.add(p, cfg) for p in prompts]  # length errors before any model work
    index = {seq: i for i, seq in enumerate(seqs)}
    while not scheduler.idle:
        for seq, piece in scheduler.step():
            if seq.error is not None:
                raise seq.error
            if piece:
                yield index[seq], piece
    return [s.result() for s in seqs]


def drain(gen) -> list[GenerationResult]:
    """Run a `generate_stream` generator to the end and return its results."""
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
