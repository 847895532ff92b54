"""Choosing the next token: the sampling settings (one definition, validated once, shared by
the Python API, the CLI and the server) and the host sampler, the reference.

A sampler turns one step's float32 logits into tokens, one row per sequence:
- `choose(logits, sequences) -> list[int]` waits for its tokens;
- samplers with `overlaps = True` (on a GPU: backends/torch_sampling.py) also offer
  `choose_later(logits, rows, into, ring)`, which leaves the tokens on the device (the next
  step's input, a `token_buffer(rows)` whose row a `put` sets from the host and a `move` copies
  to another row, on the device) and returns a handle whose `result(rows)` waits for their copy
  to the host (`ring` names the caller's landing buffers: decode steps, or first tokens; the
  handle's `refused` names rows whose unmasked token the grammar replaced), and
  `waits_for_grammar(seq)`: whether seq's choice needs the tokens before it on the host.
Each sampler keeps the random state of the sequences it has seen (seeded from their settings),
so a seeded answer is reproducible, and the grammar state of the constrained ones (`Grammars`,
engine/grammar.py): their logits outside the grammar's mask are -inf before the choice, and
the chosen token moves their grammar on. A greedy constrained row is first chosen without
its mask and the grammar asked whether it allows that token (`Grammars.settle_greedy`): when
it does, that token is the masked choice too (the best of all is the best of the allowed), so
the mask, costlier than the check, is computed only for tokens the grammar refuses. The host
sampler always checks first; the device sampler's overlapped choice (which has sent the next
step by the time the host can check) speculates only while a row's refusals are rare
(`Grammars.speculates`): a refusal there costs that row a step.
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


def greedy_constrained(seq) -> bool:
    """A row whose masked choice is its best allowed token (one that may be checked, not masked)."""
    return seq is not None and seq.cfg.constraint is not None and seq.cfg.greedy and not seq.cfg.penalizes


def history(seq) -> list[int]:
    """Prompt and answer tokens of a sequence (what a repetition penalty looks at)."""
    return list(seq.prompt.token_ids) + seq.tokens


class Grammars:
    """The grammar state of each constrained sequence a sampler has seen (kept with the
    sequence's lifetime), the masks of a step's rows, and how often each greedy row's best
    token was refused lately (a moving average: `REFUSALS_KEPT` of it stays each checked step,
    `MASKED_KEPT` each masked one)."""

    REFUSALS_KEPT = 0.8
    MASKED_KEPT = 0.95      # a masked step decays it slowly: a row refused every time retries ~1 step in 9
    SPECULATE_BELOW = 0.25  # refused share under which a row speculates: a refused step costs ~4 masks

    def __init__(self) -> None:
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._refused: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def speculates(self, seq) -> bool:
        """Whether an overlapped choice of seq goes without its mask, to be settled later."""
        return greedy_constrained(seq) and self._refused.get(seq, 0.0) < self.SPECULATE_BELOW

    def masks(self, rows, vocab: int) -> tuple[list[int], np.ndarray] | None:
        """(indices of the constrained rows, their bitmasks int32 [n, words]); None when no row
        is constrained. rows[i]: a sequence or None (a dummy row)."""
        constrained = [i for i, seq in enumerate(rows) if seq is not None and seq.cfg.constraint is not None]
        if not constrained:
            return None
        masks = np.zeros((len(constrained), mask_words(vocab)), np.int32)
        for row, i in zip(masks, constrained):
            self.matcher(rows[i]).fill_mask(row)
            if rows[i] in self._refused:  # a row that stopped speculating tries again, after a while
                self._refused[rows[i]] *= self.MASKED_KEPT
        return constrained, masks

    def matcher(self, seq):
        found = self._matchers.get(seq)
        if found is None:
            found = self._matchers[seq] = seq.cfg.constraint.matcher()
        return found

    def advance(self, rows, tokens) -> None:
        for seq, token in zip(rows, tokens):
            if seq is not None and seq.cfg.constraint is not None:
                self.matcher(seq).advance(int(token))

    def settle_greedy(self, seq, logits, best: int | None = None) -> tuple[int, bool]:
        """A speculating row's token: its best token (`best`, or the argmax of its host logits,
        float32 [vocab]) if the grammar allows it, else the best token it allows (`logits` is
        read only then); the grammar moves on by it. Returns (token, whether best was refused)."""
        matcher = self.matcher(seq)
        best = int(np.argmax(logits)) if best is None else best
        taken = matcher.try_advance(best)
        self._refused[seq] = self._refused.get(seq, 0.0) * self.REFUSALS_KEPT + (1 - self.REFUSALS_KEPT) * (not taken)
        if taken:
            return best, False
        mask = np.zeros((1, mask_words(logits.shape[-1])), np.int32)
        matcher.fill_mask(mask[0])
        token = int(np.argmax(np.where(unpack(mask, logits.shape[-1])[0], logits, -np.inf)))
        matcher.advance(token)
        return token, True


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
        host = self.backend.to_host(logits)
        raw = {i: log_softmax(host[i]) for i in self.logprobs.wanted(sequences)}
        settled = {i: self.grammars.settle_greedy(seq, host[i])[0]
                   for i, seq in enumerate(sequences) if greedy_constrained(seq)}
        rest = [None if i in settled else seq for i, seq in enumerate(sequences)]
        masks = self.grammars.masks(rest, host.shape[1])
        if masks is not None:
            rows, bits = masks
            host = host.copy()  # the backend's logits may be its own buffer
            host[rows] = np.where(unpack(bits, host.shape[1]), host[rows], -np.inf)
        tokens = [settled[i] if i in settled
                  else sample(x, seq.cfg, self.rng(seq), history(seq) if seq.cfg.penalizes else ())
                  for i, (seq, x) in enumerate(zip(sequences, host))]
        self.grammars.advance(rest, tokens)
        for i, lp in raw.items():
            k = sequences[i].cfg.logprobs
            top = np.argpartition(-lp, k)[:k]
            top = top[np.argsort(-lp[top], kind="stable")]
            self.logprobs.record(sequences[i], tokens[i], lp, top)
        return tokens
