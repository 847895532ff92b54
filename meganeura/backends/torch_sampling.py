"""Choosing next tokens on the device: greedy, temperature, top-k, top-p and repetition
penalty, vectorized over a step's rows, with one small copy of token ids back to the host
(instead of a logits row of vocabulary size per sequence).

Same rules as `generate.sample` (the host reference); the random stream differs (each
sequence draws from its own torch generator seeded from its numpy one), so seeded sampling is
reproducible per device, not across devices. Greedy choices are identical.
"""

from __future__ import annotations

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


def choose(logits: torch.Tensor, sequences) -> list[int]:
    """logits [rows, vocab] (one row per sequence, in order) -> the next token of each."""
    cfgs = [s.cfg for s in sequences]
    if all(c.temperature == 0 and c.repetition_penalty == 1.0 for c in cfgs):
        return logits.argmax(-1).tolist()
    x = logits.float()
    _penalize(x, sequences)
    greedy = x.argmax(-1)
    sampled = [i for i, c in enumerate(cfgs) if c.temperature > 0]
    if sampled:
        rows = torch.tensor(sampled, device=x.device)
        dev = lambda values: torch.tensor(values, device=x.device, dtype=torch.float32)[:, None]  # noqa: E731
        scaled = x[rows] / dev([cfgs[i].temperature for i in sampled])
        ordered, order = scaled.sort(dim=-1, descending=True)
        top_k = torch.tensor([min(cfgs[i].top_k or x.shape[1], x.shape[1]) for i in sampled], device=x.device)
        kth = ordered.gather(1, top_k[:, None] - 1)
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th value stay, as on the host
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the better tokens: keep the smallest set reaching top_p
        top_p = dev([cfgs[i].top_p if cfgs[i].top_p < 1.0 else float("inf") for i in sampled])  # 1: no cut
        probs = probs.masked_fill(before >= top_p, 0.0)
        # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i / sum(p)
        noise = torch.stack([torch.empty(x.shape[1], device=x.device).exponential_(
            generator=_generator(sequences[i], x.device)) for i in sampled])
        picked = order.gather(1, (probs / noise).argmax(-1, keepdim=True))[:, 0]
        greedy[rows] = picked
    return greedy.tolist()
