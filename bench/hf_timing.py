"""Timing transformers' `generate` the same way in every bench: a warm-up, one forward pass
over the prompt (prefill), then a fixed-length greedy answer whose time past the prefill is
the decode (tokens after the first)."""

import time

import torch


def prefill_and_decode(model, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float, float]:
    """ids [1, n] -> (the answer's token ids [tokens], prefill seconds, decode tokens/s)."""
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - t
    return out[0, ids.shape[1]:], prefill, (tokens - 1) / max(total - prefill, 1e-9)
