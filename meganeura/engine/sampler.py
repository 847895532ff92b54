"""Choosing the next token: the sampling settings (one definition, validated once, shared by
the Python API, the CLI and the server) and the host sampler, the reference.

A sampler turns one step's float32 logits into tokens, one row per sequence:
- `choose(logits, sequences) -> list[int]` waits for its tokens;
- samplers with `overlaps = True` (on a GPU: backends/torch_sampling.py) also offer
  `choose_later(logits, rows, into)`, which leaves the tokens on the device (the next step's
  input, a `token_buffer(rows)` whose row a `put` sets from the host and a `move` copies to
  another row, on the device) and returns a handle whose `result()` waits for their copy to
  the host.
Each sampler keeps the random state of the sequences it has seen (seeded from their settings),
so a seeded answer is reproducible.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off; > 1 discourages tokens already in the prompt or answer
    seed: int | None = None

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        """A repetition penalty needs every token so far on the host before each choice."""
        return self.repetition_penalty != 1.0


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


class HostSampler:
    """Tokens chosen on the host with `sample`: the CPU's sampler, and the reference."""

    overlaps = False

    def __init__(self, backend) -> None:
        self.backend = backend
        self._rngs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def rng(self, seq) -> np.random.Generator:
        gen = self._rngs.get(seq)
        if gen is None:
            gen = self._rngs[seq] = np.random.default_rng(seq.cfg.seed)
        return gen

    def choose(self, logits, sequences) -> list[int]:
        host = self.backend.to_host(logits)
        return [sample(x, seq.cfg, self.rng(seq), history(seq) if seq.cfg.penalizes else ())
                for seq, x in zip(sequences, host)]
