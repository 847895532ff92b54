"""Batch captioning throughput: images/s for 512x512 single-tile captions of 64 new tokens,
`meganeura.caption` (continuous batching, images decoded ahead) against a transformers batched
`generate` loop, in the same run, on the same images and weights, in alternating rounds.

Both sides get the same preprocessed inputs (meganeura's processor is transformers' token for
token and pixel for pixel, see tests/test_processing_*.py; transformers' own processor needs
torchvision, which the CPU venv cannot hold), so the difference is the engine. Every answer is
64 tokens (meganeura ignore_eos, transformers min_new_tokens). Without --model the weights are
random with SmolVLM2's published shapes (--shape), as in bench_gpu.py.

    python bench/bench_caption.py                                   # CUDA: 500M shapes, 256 images, batch 32
    python bench/bench_caption.py --device cpu --shape 256m --images 8 --batch 4
    python bench/bench_caption.py --model PATH/SmolVLM2-500M-Video-Instruct  # a local folder of the real model
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import meganeura
import smolvlm2_shapes  # bench/, beside this script
from meganeura.jobs import DEFAULT_PROMPT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_models: the tokenizer's specials

SHAPES = {  # shared/SMOLVLM2_FACTS.md
    "500m": smolvlm2_shapes.TEXT_500M,
    "256m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
}
SINGLE_TILE = {"do_image_splitting": False, "size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512},
               "resample": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255}
TOKENS = 64


def random_checkpoint(folder: Path, shape: str):
    """A SmolVLM2 folder with random weights of the given shapes, sized for single 512 tiles."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from meganeura.weights import load_checkpoint
    from tiny_models import SMOLVLM_SPECIALS
    tokenizer = load_checkpoint("smollm2-135m-instruct", progress=False).tokenizer
    tokenizer.add_special_tokens(SMOLVLM_SPECIALS)
    end = tokenizer.token_to_id("<end_of_utterance>")
    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        vision_config=smolvlm2_shapes.VISION,
        text_config=smolvlm2_shapes.text_config(**SHAPES[shape]),
        scale_factor=4, image_token_id=tokenizer.token_to_id("<image>"), tie_word_embeddings=False,
        eos_token_id=end)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.generation_config.eos_token_id = end
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE}))
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    return model


def single_tile_view(real: Path, folder: Path) -> None:
    """The real checkpoint's files, linked, with image splitting off (one 512x512 tile per image)."""
    for f in real.iterdir():
        if f.name != "preprocessor_config.json":
            (folder / f.name).symlink_to(f.resolve())
    config = json.loads((real / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "do_image_splitting": False}))


def photos(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    paths = []
    for i in range(count):  # a smooth gradient plus noise: JPEG-sized like a photo
        base = np.stack([(x + 40 * i) % 256, (y * 2 + 13 * i) % 256, (x + y) // 4 % 256], -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"img{i:05d}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def run_meganeura(pipe, paths: list[str], batch: int) -> list[str]:
    rows = meganeura.caption(paths, None, model=pipe, max_new_tokens=TOKENS, ignore_eos=True, batch_size=batch,
                             progress=False)
    assert all(r["error"] is None and r["completion_tokens"] == TOKENS for r in rows), rows[0]
    return [r["text"] for r in rows]


def run_transformers(hf, pipe, paths: list[str], batch: int, device: str, dtype) -> list[str]:
    """The loop a user would write: load and preprocess a batch, generate, decode; repeat."""
    texts = []
    for at in range(0, len(paths), batch):
        encs = [pipe.encode([{"role": "user", "content": [{"type": "image", "image": p},
                                                          {"type": "text", "text": DEFAULT_PROMPT}]}])
                for p in paths[at:at + batch]]
        ids = torch.from_numpy(np.stack([e.input_ids for e in encs])).to(device)
        pixels = torch.from_numpy(np.stack([e.pixel_values for e in encs])).to(device, dtype)
        mask = torch.from_numpy(np.stack([e.pixel_attention_mask for e in encs])).to(device)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                              pixel_attention_mask=mask, max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                              do_sample=False)
        texts += [pipe.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out[:, ids.shape[1]:]]
    return texts


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--model", default=None, help="a local SmolVLM2 folder (default: random weights, --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="500m")
    ap.add_argument("--images", type=int, default=256 if cuda else 8)
    ap.add_argument("--batch", type=int, default=32 if cuda else 4, help="sequences at once, both engines")
    ap.add_argument("--rounds", type=int, default=3 if cuda else 2)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    (work / "model").mkdir()
    (work / "images").mkdir()
    if args.model:
        from transformers import SmolVLMForConditionalGeneration
        single_tile_view(Path(args.model), work / "model")
        hf = SmolVLMForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
        what = f"{args.model} (real weights)"
    else:
        hf = random_checkpoint(work / "model", args.shape)
        (work / "model" / "preprocessor_config.json").write_text(json.dumps(SINGLE_TILE))
        what = f"random weights, SmolVLM2-{args.shape.upper()} shapes"
    hf = hf.to(args.device, dtype)
    pipe = meganeura.load(str(work / "model"), device=args.device, progress=False)
    paths = photos(work / "images", args.images)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{card}; torch {torch.__version__}; {what}; {args.images} images 512x512 -> 1 tile, {TOKENS} new tokens, "
          f"batch {args.batch}", flush=True)

    warm = paths[:args.batch]  # compiles, recordings and allocator pools before timing
    run_meganeura(pipe, warm, args.batch)
    run_transformers(hf, pipe, warm, args.batch, args.device, dtype)
    rates = {"meganeura": [], "transformers": []}
    answers = {}
    for r in range(args.rounds):
        for name in rates:  # alternating, so load from others hits both alike
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            answers[name] = (run_meganeura(pipe, paths, args.batch) if name == "meganeura"
                             else run_transformers(hf, pipe, paths, args.batch, args.device, dtype))
            rates[name].append(len(paths) / (time.perf_counter() - t))
            print(f"round {r + 1}: {name:12s} {rates[name][-1]:8.3g} images/s", flush=True)
    same = sum(a == b for a, b in zip(answers["meganeura"], answers["transformers"]))
    ratios = [m / t for m, t in zip(rates["meganeura"], rates["transformers"])]
    for name, values in rates.items():
        low, high = min(values), max(values)
        print(f"{name:12s} median {statistics.median(values):8.3g} images/s (range {low:.3g}-{high:.3g})")
    print(f"meganeura / transformers: median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-"
          f"{max(ratios):.2f}x); identical answers {same}/{len(paths)}")


if __name__ == "__main__":
    main()
