"""Choosing next tokens on the device: greedy, temperature, top-k, top-p and repetition
penalty, vectorized over a step's rows, with one small copy of token ids back to the host
(instead of a logits row of vocabulary size per sequence).

Same rules as `generate.sample` (the host reference); the random stream differs (each
sequence draws from its own torch generator seeded from its numpy one), so seeded sampling is
reproducible per device, not across devices. Greedy choices are identical.

`choose` waits for its tokens; `pick` is the device-only part, which the overlapped decode
runs with its settings uploaded without waiting (see TorchBackend.choose_later).
"""

from __future__ import annotations

import numpy as np
import torch


def _generator(seq, device: torch.device) -> torch.Generator:
    """The sequence's device generator, seeded once from its numpy generator."""
    gen = getattr(seq, "device_rng", None)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seq.rng.integers(2**62)))
        seq.device_rng = gen
    return gen


def _penalize(x: torch.Tensor, sequences) -> None:
    for i, seq in enumerate(sequences):
        penalty = seq.cfg.repetition_penalty
        if penalty == 1.0:
            continue
        seen = torch.tensor(sorted(set(seq.prompt.token_ids.tolist()) | set(seq.tokens)), device=x.device)
        v = x[i, seen]
        x[i, seen] = torch.where(v > 0, v / penalty, v * penalty)


def samples(seq) -> bool:
    return seq is not None and seq.cfg.temperature > 0


def settings(rows, vocab: int) -> np.ndarray:
    """[3, rows] float32: temperature (0: greedy), top_k (vocab: off), top_p (inf: off, so
    top_p = 1 cuts nothing); rows[i] is row i's sequence or None (a greedy dummy)."""
    out = np.array([[0.0], [vocab], [np.inf]], np.float32).repeat(len(rows), axis=1)
    for i, seq in enumerate(rows):
        if samples(seq):
            c = seq.cfg
            out[:, i] = c.temperature, min(c.top_k or vocab, vocab), c.top_p if c.top_p < 1.0 else np.inf
    return out


def pick(x: torch.Tensor, setting: torch.Tensor, rows) -> torch.Tensor:
    """Tokens [rows] (device) from fp32 logits x [rows, vocab] and `settings` on the device;
    nothing here waits for the GPU."""
    greedy = x.argmax(-1)
    if not any(samples(s) for s in rows):
        return greedy
    temperature, top_k, top_p = setting[0], setting[1].long(), setting[2]
    scaled = x / torch.where(temperature > 0, temperature, 1.0)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    kth = ordered.gather(1, top_k[:, None] - 1)
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th value stay, as on the host
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the better tokens: keep the smallest set reaching top_p
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i / sum(p)
    noise = torch.stack([torch.empty(x.shape[1], device=x.device).exponential_(generator=_generator(s, x.device))
                         if samples(s) else torch.ones(x.shape[1], device=x.device) for s in rows])
    picked = order.gather(1, (probs / noise).argmax(-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, picked, greedy)


def choose(logits: torch.Tensor, sequences) -> list[int]:
    """logits [rows, vocab] (one row per sequence, in order) -> the next token of each."""
    if all(not samples(s) and s.cfg.repetition_penalty == 1.0 for s in sequences):
        return logits.argmax(-1).tolist()
    x = logits.float()
    _penalize(x, sequences)
    setting = torch.from_numpy(settings(sequences, x.shape[1])).to(x.device)
    return pick(x, setting, sequences).tolist()
