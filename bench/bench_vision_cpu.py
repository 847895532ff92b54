"""SmolVLM2-500M shapes on the CPU (random weights saved in bfloat16, as SmolVLM2 ships):
the vision encoder for one 512x512 tile and for 13 tiles, and decode tok/s after a one-tile
image prompt, for meganeura at its CPU default dtype (bfloat16 for this checkpoint where the
CPU has bf16 products), meganeura float32 and transformers float32, alternated in rounds.

    .venv/bin/python bench/bench_vision_cpu.py [--rounds 3] [--tokens 32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import meganeura
from bench_caption import random_checkpoint  # bench/, beside this script
from meganeura.generate import GenerationConfig, Prompt, drain, generate_stream

TILES = (1, 13)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def meganeura_engine(pipe, pixels: np.ndarray, ids: np.ndarray, tokens: int):
    rt = pipe.runner
    rows = np.flatnonzero(ids == rt.spec.image_token_id)

    def vision(n: int) -> float:
        return timed(lambda: rt.encode_images(pixels[:n]))

    def decode() -> float:
        prompt = Prompt(ids, rt.encode_images(pixels[:1]), rows)
        [result] = drain(generate_stream(rt, [prompt], GenerationConfig(max_new_tokens=tokens, ignore_eos=True),
                                         set(), lambda t: ""))
        return result.timings["tokens_per_s"]
    return vision, decode


def transformers_engine(hf, pixels: np.ndarray, ids: np.ndarray, tokens: int):
    x_ids = torch.from_numpy(ids)[None]

    def vision(n: int) -> float:
        with torch.inference_mode():
            return timed(lambda: hf.model.get_image_features(torch.from_numpy(pixels[:n])[None]))

    def decode() -> float:
        x_pix = torch.from_numpy(pixels[:1])[None]
        with torch.inference_mode():
            prefill = timed(lambda: hf(input_ids=x_ids, pixel_values=x_pix, logits_to_keep=1))
            total = timed(lambda: hf.generate(input_ids=x_ids, pixel_values=x_pix, max_new_tokens=tokens,
                                              min_new_tokens=tokens, do_sample=False))
        return (tokens - 1) / (total - prefill)
    return vision, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-vision-cpu-"))
    hf = random_checkpoint(folder, "500m")
    hf.to(torch.bfloat16).save_pretrained(folder)  # SmolVLM2's checkpoints are bfloat16
    hf = hf.float().eval()
    default = meganeura.load(str(folder), device="cpu", progress=False)
    float32 = meganeura.load(str(folder), device="cpu", dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (max(TILES), 3, 512, 512)).astype(np.float32)
    image = default.runner.spec.vlm
    ids = np.concatenate([[1, 11126, 42], [image.image_token_id] * image.num_vision_tokens,
                          rng.integers(100, 40000, 40)]).astype(np.int64)
    engines = {f"meganeura {default.runner.options.dtype} (default)": meganeura_engine(default, pixels, ids, args.tokens),
               "meganeura float32": meganeura_engine(float32, pixels, ids, args.tokens),
               "transformers float32": transformers_engine(hf, pixels, ids, args.tokens)}
    print(f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}; SmolVLM2-500M shapes, random weights; {args.tokens} tokens after a one-tile image",
          flush=True)
    for vision, decode in engines.values():  # warm-up: plans, packing, allocator pools
        vision(1)
        decode()
    results = {name: {"vision 1": [], "vision 13": [], "decode": []} for name in engines}
    for r in range(args.rounds):
        for name, (vision, decode) in engines.items():
            got = results[name]
            got["vision 1"].append(vision(1))
            got["vision 13"].append(vision(13))
            got["decode"].append(decode())
            print(f"round {r + 1} {name:30s} vision 1 tile {got['vision 1'][-1]:6.2f} s, 13 tiles "
                  f"{got['vision 13'][-1]:6.2f} s, decode {got['decode'][-1]:5.1f} tok/s", flush=True)
    reference = results["transformers float32"]
    for name, got in results.items():
        cells = []
        for what, values in got.items():
            med, ref = statistics.median(values), statistics.median(reference[what])
            ratio = ref / med if what != "decode" else med / ref  # >1: faster than transformers
            unit = "tok/s" if what == "decode" else "s"
            cells.append(f"{what} {med:.2f} {unit} ({min(values):.2f}-{max(values):.2f}; {ratio:.2f}x speed)")
        print(f"{name:30s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
