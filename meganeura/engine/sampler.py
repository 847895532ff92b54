"""Choosing the next token: the sampling settings (one definition, validated once, shared by
the Python API, the CLI and the server) and the host sampler, the reference.

A sampler turns one step's float32 logits into tokens, one row per sequence:
- `choose(logits, sequences) -> list[int]` waits for its tokens;
- samplers with `overlaps = True` (on a GPU: backends/torch_sampling.py) also offer
  `choose_later(logits, rows, into, ring)`, which leaves the tokens on the device (the next
  step's input, a `token_buffer(rows)` whose row a `put` sets from the host and a `move` copies
  to another row, on the device) and returns a handle whose `result()` waits for their copy to
  the host (`ring` names the caller's landing buffers: decode steps, or first tokens).
Each sampler keeps the random state of the sequences it has seen (seeded from their settings),
so a seeded answer is reproducible, and the grammar state of the constrained ones (`Grammars`,
engine/grammar.py): their logits outside the grammar's mask are -inf before the choice, and
the chosen token moves their grammar on.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from .grammar import Constraint, mask_words, unpack

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off; > 1 discourages tokens already in the prompt or answer
    seed: int | None = None
    constraint: Constraint | None = None  # the answer must match it (engine/grammar.py); None: free text
    logprobs: int | None = None           # None: off; k: record each answer token's log-probability and the top k

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        problems = [f"{name}={value} ({rule})" for name, value, ok, rule in (
            ("temperature", self.temperature, self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0"),
            ("seed", self.seed, self.seed is None or 0 <= self.seed < 2**63, "in [0, 2**63)")) if not ok]
        if problems:
            raise ValueError("invalid sampling settings: " + ", ".join(problems))
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (top alternatives), "
                             f"got {self.logprobs!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be an engine.grammar.Constraint, got {type(self.constraint).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        """A repetition penalty needs every token so far on the host before each choice."""
        return self.repetition_penalty != 1.0

    @property
    def host_paced(self) -> bool:
        """Each choice needs every previous token on the host (a penalty's history) or leaves
        something there (log-probabilities): such a sequence's steps cannot run ahead of the
        host. (A grammar's mask needs the previous token only: the scheduler sends the choice
        once it is on the host, after the next decode step.)"""
        return self.penalizes or self.logprobs is not None


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history=()) -> int:
    """The next token from one row of logits (float64 softmax): the reference rules."""
    x = logits.astype(np.float64)
    if params.penalizes and len(history):
        seen = np.unique(np.asarray(history))
        x[seen] = np.where(x[seen] > 0, x[seen] / params.repetition_penalty, x[seen] * params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(x))
    x = x / params.temperature
    if params.top_k and params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        drop = order[cum - p[order] >= params.top_p]  # keep the smallest set reaching top_p
        p[drop] = 0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def history(seq) -> list[int]:
    """Prompt and answer tokens of a sequence (what a repetition penalty looks at)."""
    return list(seq.prompt.token_ids) + seq.tokens


class Grammars:
    """The grammar state of each constrained sequence a sampler has seen (kept with the
    sequence's lifetime), and the masks of a step's rows."""

    def __init__(self) -> None:
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def masks(self, rows, vocab: int) -> tuple[list[int], np.ndarray] | None:
        """(indices of the constrained rows, their bitmasks int32 [n, words]); None when no row
        is constrained. rows[i]: a sequence or None (a dummy row)."""
        constrained = [i for i, seq in enumerate(rows) if seq is not None and seq.cfg.constraint is not None]
        if not constrained:
            return None
        masks = np.zeros((len(constrained), mask_words(vocab)), np.int32)
        for row, i in zip(masks, constrained):
            seq = rows[i]
            matcher = self._matchers.get(seq)
            if matcher is None:
                matcher = self._matchers[seq] = seq.cfg.constraint.matcher()
            matcher.fill_mask(row)
        return constrained, masks

    def advance(self, rows, tokens) -> None:
        for seq, token in zip(rows, tokens):
            if seq is not None and seq.cfg.constraint is not None:
                self._matchers[seq].advance(int(token))


@dataclass(frozen=True)
class TokenLogprob:
    """An answer token's log-probability under the model (log-softmax of its raw logits: before
    temperature, penalty or grammar), and the `top` most likely tokens as (id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class Logprobs:
    """The log-probabilities of the answer tokens of each sequence that asks for them, in order
    (a sampler's record; `of(seq)`)."""

    def __init__(self) -> None:
        self._by_seq: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def wanted(self, rows) -> list[int]:
        return [i for i, seq in enumerate(rows) if seq is not None and seq.cfg.logprobs is not None]

    def record(self, seq, token: int, logprobs: np.ndarray, top_ids: np.ndarray) -> None:
        """logprobs: the row's log-softmax, indexed by token id (an array, or a dict holding at
        least the token's and top_ids' entries); top_ids: the most likely first."""
        self._by_seq.setdefault(seq, []).append(TokenLogprob(
            int(token), float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in top_ids)))

    def of(self, seq) -> list[TokenLogprob]:
        return self._by_seq.get(seq, [])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


class HostSampler:
    """Tokens chosen on the host with `sample`: the CPU's sampler, and the reference."""

    overlaps = False

    def __init__(self, backend) -> None:
        self.backend = backend
        self._rngs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.grammars = Grammars()
        self.logprobs = Logprobs()

    def rng(self, seq) -> np.random.Generator:
        gen = self._rngs.get(seq)
        if gen is None:
            gen = self._rngs[seq] = np.random.default_rng(seq.cfg.seed)
        return gen

    def choose(self, logits, sequences) -> list[int]:
        masks = self.grammars.masks(sequences, logits.shape[-1])
        host = self.backend.to_host(logits)
        raw = {i: log_softmax(host[i]) for i in self.logprobs.wanted(sequences)}
        if masks is not None:
            rows, bits = masks
            host = host.copy()  # the backend's logits may be its own buffer
            host[rows] = np.where(unpack(bits, host.shape[1]), host[rows], -np.inf)
        tokens = [sample(x, seq.cfg, self.rng(seq), history(seq) if seq.cfg.penalizes else ())
                  for seq, x in zip(sequences, host)]
        self.grammars.advance(sequences, tokens)
        for i, lp in raw.items():
            k = sequences[i].cfg.logprobs
            top = np.argpartition(-lp, k)[:k]
            top = top[np.argsort(-lp[top], kind="stable")]
            self.logprobs.record(sequences[i], tokens[i], lp, top)
        return tokens
